"""The reward server: any reward (or several) behind HTTP, standard library only (``http.server``).

``flowrl serve-reward CONFIG`` runs it; :class:`flowrl.rewards.client.RemoteReward` is the client with
the same interface as a local reward. It binds to 127.0.0.1 by default; any other address needs a bearer
token, and then every request must carry ``Authorization: Bearer <token>``.

Wire format (JSON; nothing is unpickled)::

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

Errors are JSON ``{"error": message}`` with a 4xx status (400 malformed, 401 token, 404 path, 405 method,
411 no length, 413 too large, 415 content type, 422 invalid content) or 500 (the reward failed) / 504 (the
time limit passed); the server keeps serving. ``.npy`` arrays are read with ``np.load(allow_pickle=False)``
and must be bool, int, uint or float; PNGs are size-checked before decoding.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures as cf
import hmac
import io
import ipaddress
import json
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .base import CombinedReward, Reward, build_rewards

LOOPBACK_NAMES = ("localhost",)
JSON_TYPE = "application/json"
BINARY_TYPE = "application/x-flowrl-npy"  # [8-byte big-endian n][n bytes JSON {prompts, meta}][.npy samples]
DRAIN_BYTES = 256 * 2**20  # an oversized body up to this size is read and dropped before the 413


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------- encoding
def encode_array(a: Any) -> dict:
    """{"npy": base64 of the .npy bytes} of a tensor or array (bool/int/uint/float only)."""
    return {"npy": base64.b64encode(npy_bytes(a)).decode("ascii")}


def npy_bytes(a: Any) -> bytes:
    """The .npy bytes of a tensor or array (bool/int/uint/float only)."""
    arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"only bool, int, uint and float arrays travel; got dtype {arr.dtype}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_npy_bytes(raw: bytes, what: str) -> np.ndarray:
    """The array in .npy bytes, read with allow_pickle=False; RequestError(400/422) otherwise."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RequestError(400, f"{what}: not a .npy array without pickle ({type(e).__name__}: {e})")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise RequestError(422, f"{what}: dtype {getattr(arr, 'dtype', None)} not allowed; use bool, int, uint or float")
    return arr


def decode_array(obj: Any, what: str) -> np.ndarray:
    """The array of {"npy": base64}; RequestError(400/422) for anything else. Never unpickles."""
    if not isinstance(obj, Mapping) or set(obj) != {"npy"} or not isinstance(obj["npy"], str):
        raise RequestError(400, f"{what}: expected {{\"npy\": base64 string}}")
    try:
        raw = base64.b64decode(obj["npy"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{what}: not a base64 .npy array without pickle ({type(e).__name__}: {e})")
    return decode_npy_bytes(raw, what)


def encode_png(img: Tensor) -> str:
    """base64 PNG of one image float [C, H, W] in [0, 1] (C = 1 or 3), rounded to uint8."""
    from PIL import Image

    u8 = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = u8[0].numpy() if u8.shape[0] == 1 else u8.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_pngs(items: Any, max_pixels: int) -> Tensor:
    """float [B, C, H, W] in [0, 1] from a list of base64 PNGs of one size and mode (L or RGB)."""
    from PIL import Image

    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise RequestError(400, "samples.png: expected a non-empty list of base64 PNG strings")
    arrs = []
    for i, s in enumerate(items):  # one image at a time: PIL decodes one
        try:
            im = Image.open(io.BytesIO(base64.b64decode(s, validate=True)))
            if im.format != "PNG":
                raise RequestError(415, f"samples.png[{i}]: a {im.format} image, expected PNG")
            if im.width * im.height > max_pixels:
                raise RequestError(413, f"samples.png[{i}]: {im.width}x{im.height} pixels > limit {max_pixels}")
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arrs.append(np.asarray(im, dtype=np.uint8))
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(400, f"samples.png[{i}]: not a decodable base64 PNG ({type(e).__name__}: {e})")
    if len({a.shape for a in arrs}) != 1:
        raise RequestError(422, f"samples.png: images differ in size/mode {sorted({a.shape for a in arrs})}")
    x = torch.from_numpy(np.stack(arrs)).float() / 255.0
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Limits:
    """Request limits: body bytes, samples per request, seconds per request, pixels per PNG."""

    max_body_bytes: int = 64 * 2**20
    max_batch: int = 256
    timeout_s: float = 120.0
    max_pixels: int = 4096 * 4096


# --------------------------------------------------------------------------------------------- server
class RewardServer:
    """Serve ``reward`` (a Reward or a CombinedReward) over HTTP on ``host:port`` (port 0: any free port).

    Non-loopback ``host`` requires ``token``. ``workers`` reward calls run at once (default 1: one model,
    requests queue); each must finish within ``limits.timeout_s`` or gets 504. Use ``start()`` /
    ``stop()`` (a background thread) or ``serve_forever()``.
    """

    def __init__(self, reward: Any, *, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                 limits: Optional[Limits] = None, workers: int = 1, name: Optional[str] = None):
        if not is_loopback(host) and not token:
            raise ValueError(f"reward server: binding to {host!r} (not loopback) requires a bearer token; "
                             "give --token-env NAME with the token in that environment variable")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ValueError("reward server: the token must be a string of at least 8 characters")
        if isinstance(reward, CombinedReward):
            self.combined = reward
        elif isinstance(reward, Mapping):
            self.combined = build_rewards(reward)
        else:
            self.combined = CombinedReward({reward.name: reward}, {reward.name: 1.0})
        single = len(self.combined.weights) == 1
        score_name = next(iter(self.combined.weights))  # the score part of the first (or only) reward
        self.name = name or (score_name if single else "combined")
        # one reward under its own name: its parts as they are; else the weighted sum is added under self.name
        self.single = single and self.name == score_name
        if not self.single and self.name in self.combined.weights:
            raise ValueError(f"reward server: name {self.name!r} is a reward's part name; choose another for the weighted sum")
        self.token = token
        self.limits = limits or Limits()
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="reward")
        self._httpd = ThreadingHTTPServer((host, int(port)), _make_handler(self))
        self._httpd.daemon_threads = True
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
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling (called from handler threads)
    def info(self) -> dict:
        return {"ok": True, "name": self.name, "rewards": dict(self.combined.weights),
                "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_batch": self.limits.max_batch,
                           "timeout_s": self.limits.timeout_s}}

    def parse(self, body: bytes, binary: bool = False) -> tuple[Any, list[str], Optional[dict]]:
        """(samples, prompts, meta) of a request body: JSON, or (``binary``) the framed form
        [8-byte big-endian n][n bytes of JSON {"prompts", "meta"}][.npy bytes of the samples]."""
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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"body is not JSON: {e}")
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
            if B > self.limits.max_batch:
                raise RequestError(413, f"batch of {B} samples > limit {self.limits.max_batch}")
            samples = decode_pngs(val, self.limits.max_pixels)
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
        if B > self.limits.max_batch:
            raise RequestError(413, f"batch of {B} samples > limit {self.limits.max_batch}")
        if len(prompts) != B:
            raise RequestError(422, f"{B} samples but {len(prompts)} prompts")
        meta = req.get("meta")
        if meta is not None:
            if not isinstance(meta, dict):
                raise RequestError(422, "'meta' must be a JSON object")
            meta = {k: (torch.from_numpy(decode_array(v, f"meta.{k}").copy()) if isinstance(v, dict) else v)
                    for k, v in meta.items()}
        return samples, prompts, meta

    def score(self, samples: Any, prompts: list[str], meta: Optional[dict]) -> dict:
        parts = self.combined(samples, prompts, meta)
        if not self.single:
            parts[self.name], _, _ = self.combined.combine(parts)
        return {"name": self.name, "parts": {k: encode_array(v) for k, v in parts.items()}}

    def run(self, samples: Any, prompts: list[str], meta: Optional[dict]) -> dict:
        fut = self._pool.submit(self.score, samples, prompts, meta)
        try:
            return fut.result(timeout=self.limits.timeout_s)
        except cf.TimeoutError:
            fut.cancel()
            raise RequestError(504, f"scoring took longer than the limit of {self.limits.timeout_s} s")


def _make_handler(server: RewardServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # seconds to read a request: a stalled client does not hold a thread forever
        server_version = "flowrl-reward/1"

        def log_message(self, fmt, *args):  # quiet; errors go back to the client
            pass

        def _send(self, status: int, obj: dict, close: bool = False) -> None:
            body = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if server.token is None:
                return True
            got = self.headers.get("Authorization", "")
            want = f"Bearer {server.token}"
            return hmac.compare_digest(got.encode("utf-8", "replace"), want.encode("utf-8"))

        def _guard(self, fn) -> None:
            try:
                if not self._authorised():
                    raise RequestError(401, "missing or wrong bearer token")
                fn()
            except RequestError as e:
                self._send(e.status, {"error": str(e)}, close=e.status in (411, 413))
            except Exception as e:  # the reward failed: the server keeps serving
                self._send(500, {"error": f"reward failed: {type(e).__name__}: {e}"})

        def do_GET(self) -> None:
            def go():
                if self.path.rstrip("/") != "/health":
                    raise RequestError(404 if self.path.rstrip("/") != "/score" else 405,
                                       f"no GET {self.path}; use GET /health or POST /score")
                self._send(200, server.info())

            self._guard(go)

        def do_POST(self) -> None:
            def go():
                if self.path.rstrip("/") != "/score":
                    raise RequestError(404, f"no POST {self.path}; use POST /score")
                ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                length = self.headers.get("Content-Length")
                if length is None:
                    raise RequestError(411, "Content-Length is required")
                try:
                    n = int(length)
                except ValueError:
                    raise RequestError(400, f"bad Content-Length {length!r}")
                if n < 0 or n > server.limits.max_body_bytes:
                    if 0 < n <= DRAIN_BYTES:  # read and drop it, so the client sees the 413 and not a reset
                        left = n
                        while left > 0:  # bounded: at most DRAIN_BYTES, each read under the socket timeout
                            chunk = self.rfile.read(min(left, 1 << 16))
                            if not chunk:
                                break
                            left -= len(chunk)
                    raise RequestError(413, f"body of {n} bytes > limit {server.limits.max_body_bytes}")
                body = self.rfile.read(n)
                if ctype not in (JSON_TYPE, BINARY_TYPE):
                    raise RequestError(415, f"Content-Type {ctype!r}; use {JSON_TYPE} or {BINARY_TYPE}")
                if len(body) != n:
                    raise RequestError(400, "body shorter than Content-Length")
                samples, prompts, meta = server.parse(body, binary=ctype == BINARY_TYPE)
                self._send(200, server.run(samples, prompts, meta))

            self._guard(go)

        def _no(self) -> None:
            self._guard(lambda: (_ for _ in ()).throw(RequestError(405, f"method {self.command} not allowed")))

        do_PUT = do_DELETE = do_PATCH = _no

    return Handler


def serve_from_config(path: str, *, host: Optional[str] = None, port: Optional[int] = None,
                      token: Optional[str] = None) -> RewardServer:
    """A RewardServer from a YAML/JSON file: ``{rewards: {name: {weight, type, options}}, host, port,
    workers, name, limits: {max_body_bytes, max_batch, timeout_s, max_pixels}}`` (arguments override)."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or "rewards" not in cfg:
        raise ValueError(f"{path}: a reward-server config needs a 'rewards' mapping {{name: {{weight, options}}}}")
    valid = {"rewards", "host", "port", "workers", "name", "limits"}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    lim = cfg.get("limits") or {}
    bad = sorted(set(lim) - set(Limits.__dataclass_fields__))
    if bad:
        raise ValueError(f"{path}: unknown limits {bad}; valid: {sorted(Limits.__dataclass_fields__)}")
    return RewardServer(build_rewards(cfg["rewards"]), host=host or cfg.get("host", "127.0.0.1"),
                        port=port if port is not None else int(cfg.get("port", 8765)), token=token,
                        limits=Limits(**lim), workers=int(cfg.get("workers", 1)), name=cfg.get("name"))


def cli(args: Any) -> int:
    """``flowrl serve-reward CONFIG [--host H] [--port P] [--token-env NAME]``: serve until interrupted."""
    import os
    import sys

    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        print(f"serve-reward: environment variable {args.token_env!r} (the bearer token) is not set", file=sys.stderr)
        return 2
    server = serve_from_config(args.config, host=args.host, port=args.port, token=token)
    print(f"serving {server.name} {server.info()['rewards']} at {server.url} "
          f"({'token required' if server.token else 'no token: loopback only'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
