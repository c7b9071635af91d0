"""The reward server: any reward (or several) behind HTTP.

``flowrl serve-reward CONFIG`` runs it; :class:`flowrl.rewards.client.RemoteReward` is the client with
the same interface as a local reward. It binds to 127.0.0.1 by default; any other address needs a bearer
token, and then every request must carry ``Authorization: Bearer <token>`` (the scheme in any case).

Wire format (JSON; nothing is unpickled; encoders and size-checked decoders in :mod:`flowrl.rewards.wire`)::

    POST /score   Content-Type: application/json
      {"prompts": [str] * B,
       "samples": {"npy": base64(.npy bytes)}             # float [B, C, H, W] / [B, F, C, H, W] in [0, 1], or uint8
                | {"png": [base64(PNG)] * B}               # images
                | {"text": [str] * B},                     # text
       "meta": {key: JSON value | {"npy": base64}}}       # optional, batch-first values
    -> 200 {"name": str, "parts": {key: {"npy": base64}}}
    POST /score   Content-Type: application/x-flowrl-npy      (the same without base64 or JSON around the array)
      [8-byte big-endian n][n bytes of JSON {"prompts": [...], "meta": {...}}][.npy bytes of the samples]
    GET /health -> 200 {"ok": true, "name": str, "rewards": {name: weight}, "limits": {...}}

Statuses. 4xx: the request's fault, the client must not retry it: 400 malformed (JSON, base64, .npy,
PNG, nesting too deep, a Content-Length that is not one plain number), 401 token, 404 path, 405 method,
408 the request was not received within ``request_timeout_s``, 411 no Content-Length, 413 too large
(body, batch, pixels), 415 content type, 422 invalid content (shapes, channels, dtypes, values, an input
the reward refuses with ValueError/TypeError) **and a request whose scoring ran past ``timeout_s``**: the
same input would run away again, so a retry only burns another ``timeout_s``. 5xx: the server's fault, worth
retrying: 500 the reward failed otherwise (out of memory, a crashed worker, a missing model file), 503
busy (``max_pending`` requests already wait for a worker; with ``Retry-After``). Every answer other than
200 closes the connection, so an unread or partly read body is never parsed as a next request.

How it holds up. Rewards run in worker processes (:class:`flowrl.rewards.deadline.DeadlinePool`, built
from the config inside each worker) that are SIGKILLed at ``timeout_s`` and replaced, so a runaway reward
(``9**9**9`` holds the GIL; a thread timer never fires) neither freezes ``/health`` nor outlives its
deadline. Each connection has a thread, at most ``max_connections`` of them; further connections wait in a
listen backlog of 1024 (the kernel caps it at ``net.core.somaxconn``), not reset. Each request must arrive
whole (request line, headers, body) within ``request_timeout_s`` of its first byte, whatever the pace of
the bytes; a kept-alive connection idle for ``idle_timeout_s`` is closed. Every limit is checked when the
server is built. Memory per request is bounded by ``max_body_bytes`` and, once decoded, about 12 bytes
per pixel of ``max_total_pixels`` (float32 RGB), for at most ``max_pending`` requests at a time.

Why the standard library and not uvicorn/starlette or hypercorn: each fix above is a few lines on
``http.server`` and is tested here; an asyncio server would still need its own whole-request deadline
(uvicorn has no timeout on a request's head) and its own process pool for the deadline kill, and it would
add three dependencies to every install that only serves a reward on loopback.
"""
from __future__ import annotations

import ipaddress
import json
import math
import struct
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .deadline import DeadlineExceeded, DeadlinePool, WorkerError
from .server_http import BINARY_TYPE, JSON_TYPE, LISTEN_BACKLOG, HTTPServer  # noqa: F401
from .wire import (  # noqa: F401  (encoders re-exported: the client and older callers import them from here)
    RequestError,
    check_images,
    decode_array,
    decode_npy_bytes,
    decode_pngs,
    encode_array,
    encode_png,
    npy_bytes,
)

LOOPBACK_NAMES = ("localhost",)
MAX_META_DEPTH = 32
INPUT_ERRORS = ("ValueError", "TypeError", "IndexError", "KeyError", "UnicodeError", "RequestError", "ScorerInputError")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _depth(obj: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    best, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        best = max(best, d)
        if d > MAX_META_DEPTH:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return best


@dataclass
class Limits:
    """Request limits, each checked > 0 (and finite) when built.

    max_body_bytes: bytes of one request body. max_batch: samples per request. timeout_s: seconds one
    request may spend scoring before its worker is killed (answer 422). max_pixels: pixels of one PNG.
    max_total_pixels: pixels (B * F * H * W) of one request's images after decoding. request_timeout_s:
    seconds for a whole request to arrive after its first byte. idle_timeout_s: seconds a kept-alive
    connection may wait for its next request. max_connections: connections served at once (more wait in
    the backlog). max_pending: requests scoring or waiting for a worker (more get 503).
    """

    max_body_bytes: int = 64 * 2**20
    max_batch: int = 256
    timeout_s: float = 120.0
    max_pixels: int = 4096 * 4096
    max_total_pixels: int = 2**26
    request_timeout_s: float = 60.0
    idle_timeout_s: float = 15.0
    max_connections: int = 64
    max_pending: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"reward server: limits.{f.name} must be an integer > 0; got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"reward server: limits.{f.name} must be a finite number of seconds > 0; got {v!r}")


# --------------------------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _build_in_worker(kind: str, payload: Any) -> None:
    """Initializer of each scoring worker: build the rewards from their config (or take the given object)."""
    from .base import CombinedReward
    from .build import build_rewards

    if kind == "spec":
        _WORKER["combined"] = build_rewards(payload)
    elif isinstance(payload, CombinedReward):
        _WORKER["combined"] = payload
    else:
        _WORKER["combined"] = CombinedReward({payload.name: payload}, {payload.name: 1.0})


def _describe_in_worker() -> dict:
    return {k: float(v) for k, v in _WORKER["combined"].weights.items()}


def _score_in_worker(samples: Any, prompts: list, meta: Optional[dict], total_name: Optional[str]) -> dict:
    comb = _WORKER["combined"]
    parts = comb(samples, prompts, meta)
    if total_name is not None:
        parts[total_name], _, _ = comb.combine(parts)
    return dict(parts)


# --------------------------------------------------------------------------------------------- server
class RewardServer:
    """Serve ``reward`` (a Reward, a CombinedReward, or a ``build_rewards`` config mapping, which is built
    in the workers only) over HTTP on ``host:port`` (port 0: any free port).

    Non-loopback ``host`` requires ``token``. ``workers`` scoring processes (default 1: one model copy;
    requests queue). Use ``start()`` / ``stop()`` (a background thread) or ``serve_forever()``.
    """

    def __init__(self, reward: Any, *, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                 limits: Optional[Limits] = None, workers: int = 1, name: Optional[str] = None,
                 start_method: Optional[str] = None):
        if not is_loopback(host) and not token:
            raise ValueError(f"reward server: binding to {host!r} (not loopback) requires a bearer token; "
                             "give --token-env NAME with the token in that environment variable")
        if token is not None and (not isinstance(token, str) or len(token) < 8 or token != token.strip()):
            raise ValueError("reward server: the token must be a string of at least 8 characters, no outer spaces")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"reward server: workers must be an integer >= 1; got {workers!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"reward server: port must be an integer in [0, 65535]; got {port!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"reward server: limits must be a Limits; got {type(limits).__name__}")
        self.limits = limits or Limits()
        self.token = token
        payload = ("spec", dict(reward)) if isinstance(reward, Mapping) else ("object", reward)
        self._pool = DeadlinePool(workers, start_method=start_method, initializer=_build_in_worker, initargs=payload)
        try:
            try:
                weights = self._pool.call(_describe_in_worker, timeout_s=60.0)
            except (WorkerError, DeadlineExceeded) as e:
                raise ValueError(f"reward server: the rewards could not be built: {e}") from None
            single = len(weights) == 1
            score_name = next(iter(weights))  # the score part of the first (or only) reward
            self.weights = weights
            self.name = name or (score_name if single else "combined")
            # one reward under its own name: its parts as they are; else the weighted sum is added under self.name
            self.single = single and self.name == score_name
            if not self.single and self.name in weights:
                raise ValueError(f"reward server: name {self.name!r} is a reward's part name; choose another for the weighted sum")
            self._pending = 0
            self._pending_lock = threading.Lock()
            self._httpd = HTTPServer((host, port), self)
        except BaseException:
            self._pool.close()
            raise
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]

    @property
    def url(self) -> str:
        h, p = self.address
        return f"http://{'[' + h + ']' if ':' in h else h}:{p}"

    def start(self) -> "RewardServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        finally:
            self.close()

    def stop(self) -> None:
        self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.close()

    def close(self) -> None:
        self._httpd.server_close()
        self._pool.close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling (called from handler threads)
    def info(self) -> dict:
        return {"ok": True, "name": self.name, "rewards": dict(self.weights), "limits": asdict(self.limits)}

    def parse(self, body: bytes, binary: bool = False) -> tuple[Any, list[str], Optional[dict]]:
        """(samples, prompts, meta) of a request body: JSON, or (``binary``) the framed form
        [8-byte big-endian n][n bytes of JSON {"prompts", "meta"}][.npy bytes of the samples]."""
        lim = self.limits
        raw_npy = None
        if binary:
            if len(body) < 8:
                raise RequestError(400, "binary body shorter than its 8-byte header length")
            n = struct.unpack(">Q", body[:8])[0]
            if n > len(body) - 8:
                raise RequestError(400, f"binary body: header length {n} > the {len(body) - 8} bytes that follow")
            head, raw_npy = body[8 : 8 + n], body[8 + n :]
        else:
            head = body
        try:
            req = json.loads(head.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an int of too many digits
            raise RequestError(400, f"body is not JSON: {e}")
        except RecursionError:
            raise RequestError(400, "body is not JSON this server reads: nested too deeply")
        if binary and isinstance(req, dict):
            if "samples" in req:
                raise RequestError(400, "binary body: the samples are the .npy bytes after the JSON header, not a field")
            req["samples"] = {"npy": raw_npy}
        if not isinstance(req, dict):
            raise RequestError(400, "body must be a JSON object with 'samples' and 'prompts'")
        unknown = sorted(set(req) - {"samples", "prompts", "meta"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; valid fields: ['meta', 'prompts', 'samples']")
        if "samples" not in req or "prompts" not in req:
            raise RequestError(400, "request needs 'samples' and 'prompts'")
        prompts = req["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(422, "'prompts' must be a list of strings")
        s = req["samples"]
        if not isinstance(s, dict) or len(s) != 1 or next(iter(s)) not in ("npy", "png", "text"):
            raise RequestError(400, "'samples' must be one of {\"npy\": b64}, {\"png\": [b64]}, {\"text\": [str]}")
        kind, val = next(iter(s.items()))
        if kind == "text":
            if not isinstance(val, list) or not all(isinstance(t, str) for t in val):
                raise RequestError(422, "samples.text must be a list of strings")
            samples: Any = list(val)
            B = len(samples)
        elif kind == "png":
            B = len(val) if isinstance(val, list) else 0
            if B > lim.max_batch:
                raise RequestError(413, f"batch of {B} samples > limit max_batch={lim.max_batch}")
            samples = decode_pngs(val, lim.max_pixels, lim.max_total_pixels)
        else:
            arr = decode_array(s, "samples") if not binary else decode_npy_bytes(raw_npy, "samples")
            if arr.ndim not in (4, 5):
                raise RequestError(422, f"samples.npy must be [B, C, H, W] or [B, F, C, H, W]; got shape {arr.shape}")
            if arr.dtype == np.uint8:
                samples = torch.from_numpy(arr.copy()).float() / 255.0
            elif arr.dtype.kind == "f":
                samples = torch.from_numpy(arr.astype(np.float32))
            else:
                raise RequestError(422, f"samples.npy dtype {arr.dtype}: use float in [0, 1] or uint8")
            B = int(arr.shape[0])
        if B == 0:
            raise RequestError(422, "empty batch")
        if B > lim.max_batch:
            raise RequestError(413, f"batch of {B} samples > limit max_batch={lim.max_batch}")
        if len(prompts) != B:
            raise RequestError(422, f"{B} samples but {len(prompts)} prompts")
        if kind != "text":
            check_images(samples, lim.max_total_pixels)
        meta = req.get("meta")
        if meta is not None:
            if not isinstance(meta, dict):
                raise RequestError(422, "'meta' must be a JSON object")
            if _depth(meta) > MAX_META_DEPTH:
                raise RequestError(400, f"'meta' nested deeper than {MAX_META_DEPTH} levels")
            meta = {k: (torch.from_numpy(decode_array(v, f"meta.{k}").copy()) if isinstance(v, dict) else v)
                    for k, v in meta.items()}
        return samples, prompts, meta

    def run(self, samples: Any, prompts: list[str], meta: Optional[dict]) -> dict:
        """The answer of one parsed request, scored in a worker under the ``timeout_s`` deadline."""
        total = None if self.single else self.name
        try:
            parts = self._pool.call(_score_in_worker, samples, prompts, meta, total, timeout_s=self.limits.timeout_s)
        except DeadlineExceeded:
            raise RequestError(422, f"scoring took longer than the limit of timeout_s={self.limits.timeout_s:g} s; "
                                    "its worker was killed (this input would run away again: not retried)") from None
        except WorkerError as e:
            if e.type_name in INPUT_ERRORS or (e.type_name == "RewardError" and e.chain[:1] and e.chain[0] in INPUT_ERRORS):
                raise RequestError(422, f"the reward refused this input: {e.message}") from None
            raise  # a server fault: 500
        return {"name": self.name, "parts": {k: encode_array(v) for k, v in parts.items()}}

    def admit(self) -> bool:
        """Take one of the ``max_pending`` scoring slots; False when all are taken (answer 503)."""
        with self._pending_lock:
            if self._pending >= self.limits.max_pending:
                return False
            self._pending += 1
            return True

    def release(self) -> None:
        with self._pending_lock:
            self._pending -= 1


# --------------------------------------------------------------------------------------------- config / CLI
def serve_from_config(path: str, *, host: Optional[str] = None, port: Optional[int] = None,
                      token: Optional[str] = None) -> RewardServer:
    """A RewardServer from a YAML/JSON file: ``{rewards: {name: {weight, type, options}}, host, port,
    workers, name, limits: {Limits fields}}`` (arguments override). The rewards are built in the workers."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("rewards"), dict) or not cfg["rewards"]:
        raise ValueError(f"{path}: a reward-server config needs a 'rewards' mapping {{name: {{weight, options}}}}")
    valid = {"rewards", "host", "port", "workers", "name", "limits"}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    lim = cfg.get("limits") or {}
    names = sorted(f.name for f in fields(Limits))
    if not isinstance(lim, dict) or sorted(set(lim) - set(names)):
        raise ValueError(f"{path}: unknown limits {sorted(set(lim) - set(names)) if isinstance(lim, dict) else lim!r}; "
                         f"valid: {names}")
    try:
        limits = Limits(**lim)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return RewardServer(dict(cfg["rewards"]), host=host or cfg.get("host", "127.0.0.1"),
                        port=port if port is not None else cfg.get("port", 8765), token=token,
                        limits=limits, workers=cfg.get("workers", 1), name=cfg.get("name"))


def cli(args: Any) -> int:
    """``flowrl serve-reward CONFIG [--host H] [--port P] [--token-env NAME]``: serve until interrupted."""
    import os
    import sys

    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        print(f"serve-reward: environment variable {args.token_env!r} (the bearer token) is not set", file=sys.stderr)
        return 2
    try:
        server = serve_from_config(args.config, host=args.host, port=args.port, token=token)
    except (ValueError, TypeError, OSError) as e:
        print(f"serve-reward: {e}", file=sys.stderr)
        return 2
    print(f"serving {server.name} {server.info()['rewards']} at {server.url} "
          f"({'token required' if server.token else 'no token: loopback only'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
