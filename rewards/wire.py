"""What travels between :mod:`flowrl.rewards.client` and :mod:`flowrl.rewards.server`: arrays as ``.npy`` bytes
(never pickled), images as PNG, and the checks that turn a malformed or oversized payload into a 4xx.

Every decoder here checks sizes before it allocates: a ``.npy`` header's shape must match the bytes that
follow it, and a PNG's width and height are read from its IHDR chunk (bytes 16-24) and checked against the
per-image and per-request pixel limits before any image is decompressed.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .ast_lock import AST_LOCK

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx; 503 when busy) and a message for the client."""

    def __init__(self, status: int, message: str, retry_after: int = 0):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def npy_bytes(a: Any) -> bytes:
    """The .npy bytes of a tensor or array (bool/int/uint/float only)."""
    arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"only bool, int, uint and float arrays travel; got dtype {arr.dtype}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_array(a: Any) -> dict:
    """{"npy": base64 of the .npy bytes} of a tensor or array (bool/int/uint/float only)."""
    return {"npy": base64.b64encode(npy_bytes(a)).decode("ascii")}


def decode_npy_bytes(raw: bytes, what: str) -> np.ndarray:
    """The array in .npy bytes; RequestError 400 unless the header is valid, its dtype bool/int/uint/float
    (422 otherwise) and its shape accounts for exactly the bytes that follow (checked before allocating)."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        with AST_LOCK:  # numpy parses the header with ast.literal_eval: not thread-safe on CPython < 3.11.8
            shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise RequestError(400, f"{what}: not a .npy array without pickle ({type(e).__name__}: {e})")
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise RequestError(422 if not dtype.hasobject else 400,
                           f"{what}: dtype {dtype} not allowed (an array without pickle of bool, int, uint or float)")
    count = math.prod(shape)
    data = raw[f.tell():]
    if count * dtype.itemsize != len(data):
        raise RequestError(400, f"{what}: .npy header says shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
                                f"but {len(data)} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


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


def png_size(raw: bytes, what: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decompressing anything; RequestError 400/415."""
    if raw[:8] != PNG_SIGNATURE:
        raise RequestError(415 if raw[:3] in (b"GIF", b"\xff\xd8\xff") else 400, f"{what}: not a PNG (bad signature)")
    if len(raw) < 33 or raw[12:16] != b"IHDR":
        raise RequestError(400, f"{what}: PNG without an IHDR chunk first")
    w, h = struct.unpack(">II", raw[16:24])
    if w == 0 or h == 0:
        raise RequestError(400, f"{what}: PNG of {w}x{h} pixels")
    return w, h


def decode_pngs(items: Any, max_pixels: int, max_total_pixels: int) -> Tensor:
    """float [B, C, H, W] in [0, 1] from a list of base64 PNGs of one size and mode (L or RGB; others become
    RGB). Every header is checked against ``max_pixels`` (per image) and the sum against
    ``max_total_pixels`` (per request) before the first image is decompressed."""
    from PIL import Image

    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise RequestError(400, "samples.png: expected a non-empty list of base64 PNG strings")
    raws, total = [], 0
    for i, s in enumerate(items):
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"samples.png[{i}]: not base64 ({e})")
        w, h = png_size(raw, f"samples.png[{i}]")
        if w * h > max_pixels:
            raise RequestError(413, f"samples.png[{i}]: {w}x{h} pixels > limit max_pixels={max_pixels}")
        total += w * h
        if total > max_total_pixels:
            raise RequestError(413, f"samples.png: {total} pixels in images 0..{i} > limit max_total_pixels={max_total_pixels}")
        raws.append((raw, w, h))
    arrs = []
    for i, (raw, w, h) in enumerate(raws):  # one image at a time: PIL decodes one
        try:
            im = Image.open(io.BytesIO(raw), formats=["PNG"])
            if im.size != (w, h):
                raise RequestError(400, f"samples.png[{i}]: header says {w}x{h}, PIL reads {im.size}")
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arrs.append(np.asarray(im, dtype=np.uint8))
        except RequestError:
            raise
        except Exception as e:  # truncated or corrupt data: the request's fault
            raise RequestError(400, f"samples.png[{i}]: not a decodable PNG ({type(e).__name__}: {e})")
    if len({a.shape for a in arrs}) != 1:
        raise RequestError(422, f"samples.png: images differ in size/mode {sorted({a.shape for a in arrs})}")
    x = torch.from_numpy(np.stack(arrs)).float() / 255.0
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def check_images(x: Tensor, max_total_pixels: int, what: str = "samples") -> None:
    """422 unless ``x`` is float [B, C, H, W] or [B, F, C, H, W] with C in (1, 3) and finite values in
    [0, 1]; 413 if B * F * H * W > ``max_total_pixels``."""
    if x.dim() not in (4, 5):
        raise RequestError(422, f"{what} must be [B, C, H, W] or [B, F, C, H, W]; got shape {tuple(x.shape)}")
    C = x.shape[-3]
    if C not in (1, 3):
        raise RequestError(422, f"{what}: {C} channels in shape {tuple(x.shape)}; images have 1 (grey) or 3 (RGB)")
    pixels = x.numel() // C
    if pixels > max_total_pixels:
        raise RequestError(413, f"{what}: {pixels} pixels > limit max_total_pixels={max_total_pixels}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise RequestError(422, f"{what}: non-finite values")
    if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise RequestError(422, f"{what}: values in [{float(x.min()):.4g}, {float(x.max()):.4g}]; images lie in [0, 1]")
