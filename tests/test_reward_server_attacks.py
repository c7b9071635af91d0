"""Reward server under attack, on loopback: a refused request's body is never parsed as the next request, a
client that trickles bytes or lies about its Content-Length is cut off at the whole-request deadline, a full
server answers 503 with Retry-After, a PNG that decompresses past the pixel budget is refused from its header,
and nonsense limits are refused when the server is built."""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

torch.set_num_threads(1)

from flowrl.rewards import RewardError, build_reward, register_reward  # noqa: E402
from flowrl.rewards.client import RemoteReward  # noqa: E402
from flowrl.rewards.server import Limits, RewardServer, serve_from_config  # noqa: E402

HIDDEN = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # a request smuggled inside a body


@register_reward("attack_test_mean")
def _mean(samples, prompts, meta):
    if isinstance(samples, list):
        return torch.tensor([float(len(s)) for s in samples])
    return samples.flatten(1).float().mean(1)


@register_reward("attack_test_slow")
def _slow(samples, prompts, meta):
    time.sleep(1.5)
    return torch.zeros(len(prompts))


def _limits(**kw) -> Limits:
    return Limits(**kw)


def _exchange(srv, raw: bytes, wait_s: float = 3.0) -> bytes:
    """Everything the server sends back on one connection after ``raw``, until it closes (or ``wait_s``)."""
    with socket.create_connection(srv.address, timeout=wait_s) as s:
        s.sendall(raw)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionError):
            pass
        return out


@pytest.fixture(scope="module")
def server():
    srv = RewardServer(build_reward("attack_test_mean"), port=0, token="attack-token-123",
                       limits=_limits(request_timeout_s=1.5, idle_timeout_s=5, max_total_pixels=2**22)).start()
    yield srv
    srv.stop()


AUTH = b"Authorization: Bearer attack-token-123\r\n"


def test_refused_body_is_never_parsed_as_the_next_request(server):
    attacks = {
        "wrong token": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
        "unknown path": b"POST /nope HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
        "wrong content type": b"POST /score HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n",
        "GET with a body": b"GET /health HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: %d\r\n\r\n",
    }
    for what, head in attacks.items():
        out = _exchange(server, (head % len(HIDDEN)) + HIDDEN)
        assert out.count(b"HTTP/1.1 ") == 1 and not out.startswith(b"HTTP/1.1 200"), (what, out[:300])
    # a Content-Length shorter than the body: the rest is not served as a request either
    body = b"{bad}"
    out = _exchange(server, b"POST /score HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body + HIDDEN)
    assert out.startswith(b"HTTP/1.1 400") and out.count(b"HTTP/1.1 ") == 1, out[:300]
    # a good request keeps the connection alive: two answers on one connection
    good = json.dumps({"samples": {"text": ["abc"]}, "prompts": ["p"]}).encode()
    req = (b"POST /score HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(good) + good)
    out = _exchange(server, req + b"GET /health HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2, out[:300]


def test_slow_and_lying_clients_cut_off_at_the_request_deadline(server):
    """request_timeout_s=1.5 for the whole request, however steadily the bytes come."""
    def trickle(prefix: bytes, rest: bytes) -> tuple[bytes, float]:
        with socket.create_connection(server.address, timeout=6) as s:
            t0 = time.monotonic()
            s.sendall(prefix)
            out = b""
            for i in range(len(rest)):  # one byte every 0.3 s, well inside any per-read timeout
                if time.monotonic() - t0 > 6:
                    break
                try:
                    s.sendall(rest[i : i + 1])
                    s.settimeout(0.3)
                    chunk = s.recv(65536)
                    out += chunk
                    if not chunk or out:
                        break
                except socket.timeout:
                    continue
                except ConnectionError:
                    break
            return out, time.monotonic() - t0

    head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
    out, dt = trickle(b"P", head[1:] + b"Content-Length: 30\r\n\r\n")  # the head itself, a byte at a time
    assert dt < 1.5 + 1.0, (dt, out[:200])
    out, dt = trickle(head + b"Content-Length: 30\r\n\r\n", b'{"prompts": ["p"], "samples": 1}')  # the body
    assert out.startswith(b"HTTP/1.1 408") and dt < 1.5 + 1.0, (dt, out[:200])
    t0 = time.monotonic()  # a Content-Length that promises more than ever comes
    out = _exchange(server, head + b"Content-Length: 1000\r\n\r\n{}", wait_s=6)
    assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 1.5 + 1.0, out[:200]


def _png(w: int, h: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_pixel_budget_refuses_a_png_bomb_from_its_header(server, monkeypatch):
    from PIL import Image

    bomb = _png(2048, 2048)  # a few KB that decode to 4 Mpixel each
    assert len(bomb) < 8000
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    c = RemoteReward(server.url, token="attack-token-123", name="attack_test_mean", retries=0)
    with pytest.raises(RewardError, match="HTTP 413.*max_total_pixels=4194304"):
        c._request("/score", json.dumps({"samples": {"png": [bomb, bomb]}, "prompts": ["p", "q"]}).encode())
    with pytest.raises(RewardError, match="HTTP 413.*max_pixels"):
        c._request("/score", json.dumps({"samples": {"png": [_png(4097, 4096)]}, "prompts": ["p"]}).encode())
    assert not opened  # refused from the headers: nothing was decompressed
    ans = c._request("/score", json.dumps({"samples": {"png": [_png(64, 64)] * 2}, "prompts": ["p", "q"]}).encode())
    assert "attack_test_mean" in ans["parts"] and len(opened) == 2
    with pytest.raises(RewardError, match="HTTP 413.*max_total_pixels"):  # the same budget for raw arrays
        c(torch.zeros(5, 3, 1024, 1024, dtype=torch.uint8), ["p"] * 5)


def test_full_server_answers_503_with_retry_after_and_the_client_waits():
    srv = RewardServer(build_reward("attack_test_slow"), port=0, limits=_limits(max_pending=1)).start()
    try:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("out", RemoteReward(srv.url, retries=0)(["a"], ["p"])))
        t.start()
        time.sleep(0.7)  # the first request holds the only slot
        body = json.dumps({"samples": {"text": ["b"]}, "prompts": ["p"]}).encode()
        out = _exchange(srv, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert out.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 1\r\n" in out, out[:300]
        with pytest.raises(RewardError, match="failed after 1 attempts.*HTTP 503.*busy"):
            RemoteReward(srv.url, name="attack_test_slow", retries=0)(["b"], ["p"])
        t0 = time.monotonic()  # a 503 is retried, after at least Retry-After seconds
        got = RemoteReward(srv.url, name="attack_test_slow", retries=2, backoff=0.01)(["c"], ["p"])
        assert got["attack_test_slow"].tolist() == [0.0] and time.monotonic() - t0 >= 1.0
        t.join(timeout=30)
        assert first["out"]["attack_test_slow"].tolist() == [0.0]
    finally:
        srv.stop()


@pytest.mark.parametrize("field,value", [("max_batch", -1), ("timeout_s", -5), ("max_body_bytes", 0),
                                         ("timeout_s", float("nan")), ("max_pixels", True), ("max_pending", 2.5),
                                         ("request_timeout_s", float("inf"))])
def test_nonsense_limits_refused_at_start(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"limits.{field} must be"):
        _limits(**{field: value})
    cfg = tmp_path / "serve.yaml"
    as_yaml = ".nan" if value != value else ".inf" if value == float("inf") else json.dumps(value)
    cfg.write_text(f"rewards:\n  jpeg_compressibility: 1.0\nport: 0\nlimits:\n  {field}: {as_yaml}\n")
    with pytest.raises(ValueError, match=f"serve.yaml: reward server: limits.{field} must be"):
        serve_from_config(str(cfg)).stop()


def test_cli_refuses_bad_config_in_one_line(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("rewards:\n  jpeg_compressibility: 1.0\nport: 0\nlimits: {max_batch: -1}\n")
    r = subprocess.run([sys.executable, "-m", "flowrl.cli", "serve-reward", str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "limits.max_batch must be an integer > 0; got -1" in r.stderr
    assert "Traceback" not in r.stderr
