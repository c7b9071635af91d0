"""Client of the reward server (:mod:`flowrl.rewards.server`), with the interface of a local reward.

``RemoteReward(url)(samples, prompts, meta) -> dict[str, float [B]]`` sends the batch (images/video as a
raw ``.npy`` array after a JSON header, or PNGs; text as JSON), retries what may pass: connection
failures and 5xx answers (the server's fault; 503 busy, after at least its ``Retry-After`` seconds), with
exponential back-off (``backoff * 2**i`` seconds, ``retries`` times), and then raises :class:`RewardError`.
A 4xx answer is the request's fault (malformed, too large, or its scoring ran past the server's
``timeout_s``: 422) and raises at once with the server's message; retrying it would fail the same way.
"""
from __future__ import annotations

import json
import os
import struct
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Reward, RewardError, register_reward, to_image_tensor
from .server_http import BINARY_TYPE, JSON_TYPE
from .wire import decode_array, encode_array, encode_png, npy_bytes

RETRY_STATUS = (500, 502, 503, 504)  # 5xx only: a 4xx fails the same way again
MAX_RETRY_AFTER_S = 60.0


@register_reward("remote")
class RemoteReward(Reward):
    """A reward served by ``flowrl serve-reward``: same call, same parts as the served reward(s).

    url: e.g. "http://127.0.0.1:8765". token / token_env: the bearer token, or the name of the environment
    variable holding it. image_format: "npy" (exact floats) or "png" (uint8, smaller). timeout: seconds per
    HTTP call. retries / backoff: retry schedule for failures that may pass. name: the server's name
    (asked from /health when not given).
    """

    FORMATS = ("npy", "png")

    def __init__(self, url: str, *, token: Optional[str] = None, token_env: Optional[str] = None,
                 image_format: str = "npy", timeout: float = 300.0, retries: int = 3, backoff: float = 0.5,
                 name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name or "remote", on_error=on_error)
        if image_format not in self.FORMATS:
            raise ValueError(f"remote reward: image_format={image_format!r} is not valid; valid values: {list(self.FORMATS)}")
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://; got {url!r}")
        if token is None and token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(f"remote reward: environment variable {token_env!r} holding the token is not set")
        if int(retries) < 0 or float(backoff) < 0 or float(timeout) <= 0:
            raise ValueError("remote reward: need retries >= 0, backoff >= 0, timeout > 0")
        self.url, self.token, self.image_format = str(url).rstrip("/"), token, image_format
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        if name is None:
            self.name = self.health()["name"]

    # -- HTTP with retries
    def _request(self, path: str, body: Optional[bytes] = None, content_type: str = JSON_TYPE) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last, wait_at_least = "", 0.0
        for attempt in range(self.retries + 1):  # bounded
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), wait_at_least))
            wait_at_least = 0.0
            req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                try:
                    msg = json.loads(e.read().decode("utf-8")).get("error", "")
                except Exception:
                    msg = e.reason
                last = f"HTTP {e.code}: {msg}"
                retry_after = (e.headers.get("Retry-After") or "").strip() if e.headers is not None else ""
                if retry_after.isdigit():
                    wait_at_least = min(float(retry_after), MAX_RETRY_AFTER_S)
                if e.code not in RETRY_STATUS:
                    raise RewardError(f"reward server {self.url}{path} refused the request: {last}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RewardError(f"reward server {self.url}{path} failed after {self.retries + 1} attempts; last error: {last}")

    def health(self) -> dict:
        """The server's /health answer: name, reward weights, limits."""
        return self._request("/health")

    # -- the reward interface
    def _samples(self, samples: Any) -> dict:
        if isinstance(samples, (list, tuple)) and samples and all(isinstance(s, str) for s in samples):
            return {"text": list(samples)}
        if isinstance(samples, Tensor) and samples.dim() == 5:
            return encode_array(samples.float())
        x = to_image_tensor(samples)
        if self.image_format == "png":
            return {"png": [encode_png(x[i]) for i in range(x.shape[0])]}
        return encode_array(x)

    @staticmethod
    def _meta(meta: Any) -> Optional[dict]:
        if meta is None:
            return None
        out = {}
        for k, v in meta.items():
            out[k] = encode_array(v) if isinstance(v, (Tensor, np.ndarray)) else v
        return out

    def score(self, samples: Any, prompts: Sequence[str], meta: Any) -> dict:
        is_text = isinstance(samples, (list, tuple)) and bool(samples) and all(isinstance(t, str) for t in samples)
        binary = not is_text and self.image_format == "npy"  # the array travels raw after a small JSON header
        body = {"prompts": list(prompts)}
        if not binary:
            body["samples"] = self._samples(samples)
        if meta is not None:
            body["meta"] = self._meta(meta)
        try:
            head = json.dumps(body, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise TypeError(f"remote reward: meta must hold tensors, arrays or JSON values; {e}") from None
        if binary:
            x = samples.float() if isinstance(samples, Tensor) and samples.dim() == 5 else to_image_tensor(samples)
            ans = self._request("/score", struct.pack(">Q", len(head)) + head + npy_bytes(x), BINARY_TYPE)
        else:
            ans = self._request("/score", head)
        return {k: torch.from_numpy(decode_array(v, f"answer part {k}").copy()) for k, v in ans["parts"].items()}
