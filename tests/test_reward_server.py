"""Reward server on loopback (port 0, a thread; rewards in worker processes): round trips equal the local reward;
bad requests get a clear 4xx and the server keeps serving; 50 concurrent clients x 20 requests with no retries;
token; a runaway reward is killed at its deadline while /health answers; the client retries 5xx only.
HTTP-level attacks (desync, slow clients, busy, pixel bombs, limits) are in test_reward_server_attacks.py."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from flowrl.rewards import RewardError, build_reward, build_rewards, register_reward  # noqa: E402
from flowrl.rewards.client import RemoteReward  # noqa: E402
from flowrl.rewards.server import Limits, RewardServer, encode_array, encode_png, npy_bytes  # noqa: E402


@register_reward("server_test_mean")
def _mean_reward(samples, prompts, meta):
    """Model-free test reward: mean pixel (images/video) or length (text), plus the prompt's length."""
    if isinstance(samples, list):
        base = torch.tensor([float(len(s)) for s in samples])
    else:
        base = samples.flatten(1).float().mean(1)
    extra = torch.as_tensor(meta["bonus"], dtype=torch.float32) if meta and "bonus" in meta else 0.0
    return {"server_test_mean": base + extra, "server_test_mean/prompt_len": torch.tensor([float(len(p)) for p in prompts])}


@register_reward("server_test_slow")
def _slow_reward(samples, prompts, meta):
    time.sleep(0.6)
    return torch.zeros(len(prompts))


@register_reward("server_test_power")
def _power_reward(samples, prompts, meta):
    """1 per sample; the text "runaway" computes 9 ** 9 ** 9, which holds the GIL for minutes."""
    for s in samples:
        if s == "runaway":
            9 ** (9 ** 9)
    return torch.ones(len(samples))


@register_reward("server_test_broken")
def _broken_reward(samples, prompts, meta):
    raise RuntimeError("the model fell over")


@pytest.fixture(scope="module")
def server():
    comb = build_rewards({"server_test_mean": {"weight": 1.0}, "jpeg_incompressibility": {"weight": 0.5}})
    srv = RewardServer(comb, port=0, workers=2, limits=Limits(max_body_bytes=200_000, max_batch=16, timeout_s=30)).start()
    yield srv
    srv.stop()


def _raw(srv, method, path, body=b"", headers=None):
    """(status, JSON answer) of one raw HTTP request."""
    h, p = srv.address
    c = http.client.HTTPConnection(h, p, timeout=20)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, json.loads(r.read().decode())
    finally:
        c.close()


def test_round_trip_equals_local(server):
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    local = build_rewards({"server_test_mean": {"weight": 1.0}, "jpeg_incompressibility": {"weight": 0.5}})
    want = local(x, prompts)
    want_outcome, _, _ = local.combine(want)
    client = RemoteReward(server.url)
    assert client.name == "combined"
    got = client(x, prompts)
    assert set(got) == set(want) | {"combined"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    torch.testing.assert_close(got["combined"], want_outcome, rtol=0, atol=0)
    # PNG transport: exact for images already on the uint8 grid
    xq = (x * 255).round() / 255
    got_png = RemoteReward(server.url, image_format="png")(xq, prompts)
    want_q = local(xq, prompts)
    for k in want_q:
        torch.testing.assert_close(got_png[k], want_q[k], rtol=0, atol=1e-6)
    # a client given the name reads that part; a name the server does not serve fails loudly on the first call
    named = RemoteReward(server.url, name="combined")
    torch.testing.assert_close(named(x, prompts)["combined"], want_outcome, rtol=0, atol=0)
    with pytest.raises(RewardError, match="must return a dict with the key 'pickscore'"):
        RemoteReward(server.url, name="pickscore")(x, prompts)
    # text, video and tensor meta
    single = RewardServer(build_reward("server_test_mean"), port=0).start()
    try:
        c = RemoteReward(single.url)
        assert c.name == "server_test_mean"
        out = c(["xy", "z"], ["p", "q"], {"bonus": torch.tensor([1.0, 2.0])})
        assert out["server_test_mean"].tolist() == [3.0, 3.0]
        v = torch.rand(2, 3, 3, 4, 4)
        torch.testing.assert_close(c(v, ["p", "q"])["server_test_mean"], v.flatten(1).mean(1), rtol=0, atol=0)
        # the remote reward inside a local combination, like any reward
        comb = build_rewards({"r": {"type": "remote", "url": single.url, "name": "server_test_mean", "weight": 2.0}})
        outcome, parts, valid, _ = comb.score(["abc"], ["p"])
        assert outcome.tolist() == [6.0] and valid.all()
        # one reward whose score part is named apart from its config key
        renamed = RewardServer(build_rewards({"r": {"type": "server_test_mean", "name": "mine"}}), port=0).start()
        try:
            c2 = RemoteReward(renamed.url)
            assert c2.name == "mine" and c2(["ab"], ["p"])["mine"].tolist() == [2.0]
        finally:
            renamed.stop()
        with pytest.raises(ValueError, match="is a reward's part name"):
            RewardServer(build_rewards({"server_test_mean": 1.0, "jpeg_compressibility": 1.0}), port=0, name="server_test_mean")
    finally:
        single.stop()


def _post(srv, obj, headers=None):
    body = json.dumps(obj).encode()
    return _raw(srv, "POST", "/score", body, {"Content-Type": "application/json", **(headers or {})})


def _framed(head, raw):
    h = json.dumps(head).encode()
    return struct.pack(">Q", len(h)) + h + raw


def _ok_body(B=2):
    return {"samples": encode_array(torch.rand(B, 3, 8, 8)), "prompts": ["p"] * B}


def _lying_npy() -> bytes:
    """A .npy header claiming [10**6, 3, 10**6, 1] float64 (24 TB) over 16 bytes of data."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 3, 10**6, 1)})
    return f.getvalue() + bytes(16)


def test_bad_requests_refused_and_server_keeps_serving(server):
    obj_arr = io.BytesIO()
    np.save(obj_arr, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = {"samples": {"npy": base64.b64encode(obj_arr.getvalue()).decode()}, "prompts": ["p"]}
    cases = [
        ("malformed JSON", lambda: _raw(server, "POST", "/score", b"{not json", {"Content-Type": "application/json"}), 400, "not JSON"),
        ("missing field", lambda: _post(server, {"samples": {"text": ["a"]}}), 400, "needs 'samples' and 'prompts'"),
        ("unknown field", lambda: _post(server, {**_ok_body(), "extra": 1}), 400, "unknown field"),
        ("bad base64", lambda: _post(server, {"samples": {"npy": "!!!"}, "prompts": ["p"]}), 400, "base64 .npy"),
        ("pickled object array", lambda: _post(server, pickled), 400, "without pickle"),
        ("wrong content type", lambda: _raw(server, "POST", "/score", b"abc", {"Content-Type": "text/plain"}), 415, "application/json"),
        ("wrong sample type", lambda: _post(server, {"samples": {"gif": "x"}, "prompts": ["p"]}), 400, "must be one of"),
        ("wrong prompt type", lambda: _post(server, {"samples": {"text": ["a"]}, "prompts": [3]}), 422, "list of strings"),
        ("wrong dtype", lambda: _post(server, {"samples": encode_array(np.zeros((1, 3, 4, 4), np.complex64)
                                                                           .real.astype(np.int64)), "prompts": ["p"]}), 422, "dtype"),
        ("wrong rank", lambda: _post(server, {"samples": encode_array(np.zeros((3, 4), np.float32)), "prompts": ["p"] * 3}), 422, "shape"),
        ("count mismatch", lambda: _post(server, {"samples": {"text": ["a", "b"]}, "prompts": ["p"]}), 422, "2 samples but 1 prompts"),
        ("batch too big", lambda: _post(server, {"samples": {"text": ["a"] * 17}, "prompts": ["p"] * 17}), 413, "max_batch=16"),
        ("body too big", lambda: _post(server, {"samples": {"text": ["a" * 300_000]}, "prompts": ["p"]}), 413, "max_body_bytes=200000"),
        ("unknown path", lambda: _raw(server, "POST", "/nope", b"{}", {"Content-Type": "application/json"}), 404, "POST /score"),
        ("wrong method", lambda: _raw(server, "GET", "/score"), 405, "POST /score"),
        ("binary: short", lambda: _raw(server, "POST", "/score", b"\x00\x01", {"Content-Type": "application/x-flowrl-npy"}), 400, "8-byte"),
        ("binary: bad header length", lambda: _raw(server, "POST", "/score", struct.pack(">Q", 999) + b"{}",
                                                   {"Content-Type": "application/x-flowrl-npy"}), 400, "header length 999"),
        ("binary: truncated header", lambda: _raw(server, "POST", "/score", struct.pack(">Q", 16) + b'{"prompts":["p"]}'[:16]
                                               + b"", {"Content-Type": "application/x-flowrl-npy"}), 400, "not JSON"),
        ("binary: object array", lambda: _raw(server, "POST", "/score", _framed({"prompts": ["p"]}, obj_arr.getvalue()),
                                              {"Content-Type": "application/x-flowrl-npy"}), 400, "without pickle"),
        ("binary: samples field", lambda: _raw(server, "POST", "/score", _framed({"prompts": ["p"], "samples": 1}, b""),
                                               {"Content-Type": "application/x-flowrl-npy"}), 400, "not a field"),
        ("not a PNG", lambda: _post(server, {"samples": {"png": [base64.b64encode(b"hello").decode()]}, "prompts": ["p"]}), 400, "PNG"),
        ("text to an image reward", lambda: _post(server, {"samples": {"text": ["a"]}, "prompts": ["p"]}), 422,
         "jpeg_incompressibility"),
        ("2-channel image", lambda: _post(server, {"samples": encode_array(torch.rand(2, 2, 8, 8)), "prompts": ["p"] * 2}),
         422, "2 channels"),
        ("pixels outside [0, 1]", lambda: _post(server, {"samples": encode_array(torch.full((1, 3, 4, 4), 7.0)),
                                                         "prompts": ["p"]}), 422, "[0, 1]"),
        ("100k-deep JSON", lambda: _raw(server, "POST", "/score", b"[" * 100_000 + b"]" * 100_000,
                                        {"Content-Type": "application/json"}), 400, "nested too deeply"),
        ("deep meta", lambda: _post(server, {**_ok_body(), "meta": {"k": json.loads("[" * 200 + "]" * 200)}}), 400, "nested deeper"),
        ("huge JSON integer", lambda: _raw(server, "POST", "/score", b'{"prompts": ' + b"9" * 5000 + b"}",
                                           {"Content-Type": "application/json"}), 400, "not JSON"),
        (".npy header lies about its shape", lambda: _raw(server, "POST", "/score", _framed({"prompts": ["p"]}, _lying_npy()),
                                                          {"Content-Type": "application/x-flowrl-npy"}), 400, "header says shape"),
        ("malformed base64 PNG", lambda: _post(server, {"samples": {"png": ["%%%"]}, "prompts": ["p"]}), 400, "not base64"),
        ("Content-Length not a number", lambda: _raw(server, "POST", "/score", b"{}", {"Content-Type": "application/json",
                                                                                         "Content-Length": "+2"}), 400, "Content-Length"),
    ]
    for what, call, status, msg in cases:
        got_status, ans = call()
        assert got_status == status, (what, got_status, ans)
        assert msg in ans["error"], (what, ans)
        # still serving, and correctly
        s, ok = _post(server, _ok_body())
        assert s == 200 and set(ok["parts"]) == {"server_test_mean", "server_test_mean/prompt_len", "jpeg_incompressibility", "combined"}


def test_client_raises_on_4xx_with_message(server):
    with pytest.raises(RewardError, match="HTTP 413.*max_batch=16"):
        RemoteReward(server.url)(torch.rand(17, 3, 4, 4), ["p"] * 17)


def test_token_required_off_loopback_and_checked():
    with pytest.raises(ValueError, match="requires a bearer token"):
        RewardServer(build_reward("server_test_mean"), host="0.0.0.0", port=0)
    srv = RewardServer(build_reward("server_test_mean"), port=0, token="s3cret-token-123").start()
    try:
        for hdr in ({}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": "s3cret-token-123"},
                    {"Authorization": "Basic s3cret-token-123"}, {"Authorization": "Bearer s3cret-token-12"}):
            s, ans = _post(srv, _ok_body(), hdr)
            assert s == 401 and "bearer token" in ans["error"], (hdr, s, ans)
            s, ans = _raw(srv, "GET", "/health", headers=hdr)
            assert s == 401
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # the scheme is case-insensitive (RFC 9110)
            s, ans = _post(srv, _ok_body(), {"Authorization": f"{scheme} s3cret-token-123"})
            assert s == 200, (scheme, s, ans)
        with pytest.raises(RewardError, match="HTTP 401"):
            RemoteReward(srv.url, name="server_test_mean")(["a"], ["p"])
        os.environ["FLOWRL_TEST_TOKEN"] = "s3cret-token-123"
        c = RemoteReward(srv.url, token_env="FLOWRL_TEST_TOKEN")
        assert c(["abc"], ["p"])["server_test_mean"].tolist() == [3.0]
    finally:
        os.environ.pop("FLOWRL_TEST_TOKEN", None)
        srv.stop()


def test_runaway_reward_killed_at_deadline_while_health_answers():
    """9 ** 9 ** 9 holds the GIL: the server still answers /health within a second, the request gets a
    non-retryable 422 at its deadline, and the next request is scored by a fresh worker."""
    srv = RewardServer(build_reward("server_test_power"), port=0, limits=Limits(timeout_s=2.0)).start()
    try:
        assert _post(srv, {"samples": {"text": ["ok"]}, "prompts": ["p"]})[0] == 200  # the worker is warm
        got = {}

        def runaway():
            t0 = time.monotonic()
            got["answer"] = _post(srv, {"samples": {"text": ["runaway"]}, "prompts": ["p"]})
            got["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=runaway)
        t.start()
        time.sleep(0.5)  # the runaway is being scored now
        for _ in range(3):
            t0 = time.monotonic()
            s, ans = _raw(srv, "GET", "/health")
            assert s == 200 and ans["ok"] and time.monotonic() - t0 < 1.0
            time.sleep(0.2)
        t.join(timeout=30)
        s, ans = got["answer"]
        assert s == 422 and "timeout_s=2 s" in ans["error"], (s, ans)
        assert got["seconds"] < 2.0 + 1.5
        s, ans = _post(srv, {"samples": {"text": ["ok", "fine"]}, "prompts": ["p", "q"]})
        assert s == 200
        with pytest.raises(RewardError, match="HTTP 422.*timeout_s"):  # not retried: at once, no back-off
            RemoteReward(srv.url, retries=3, backoff=5.0)(["runaway"], ["p"])
    finally:
        srv.stop()


def test_client_retries_5xx_only():
    srv = RewardServer(build_reward("server_test_broken"), port=0).start()
    try:
        s, ans = _post(srv, {"samples": {"text": ["a"]}, "prompts": ["p"]})
        assert s == 500 and "the model fell over" in ans["error"]
        t0 = time.monotonic()
        with pytest.raises(RewardError, match="failed after 2 attempts.*HTTP 500"):
            RemoteReward(srv.url, retries=1, backoff=0.3)(["a"], ["p"])
        assert time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        with pytest.raises(RewardError, match="refused the request: HTTP 413"):  # a 4xx: no retry, no back-off
            RemoteReward(srv.url, retries=3, backoff=5.0)(["a"] * 300, ["p"] * 300)
        assert time.monotonic() - t0 < 5.0
    finally:
        srv.stop()


def test_fifty_concurrent_clients_twenty_requests_each_without_retries():
    """1,000 requests from 50 threads at once, each on its own connection, no client retries: every one answered
    correctly (a listen backlog of 5 reset some of these connections)."""
    srv = RewardServer(build_reward("server_test_mean"), port=0, workers=2).start()
    results, errors = {}, []

    def worker(w):
        try:
            c = RemoteReward(srv.url, name="server_test_mean", retries=0, timeout=60)
            g = torch.Generator().manual_seed(100 + w)
            for i in range(20):
                B = 1 + (w + i) % 3
                x = torch.rand(B, 1, 4, 4, generator=g)
                prompts = [f"w{w}i{i}" + "x" * j for j in range(B)]
                out = c(x, prompts)
                results[(w, i)] = torch.equal(out["server_test_mean"], x.flatten(1).mean(1)) and out[
                    "server_test_mean/prompt_len"].tolist() == [float(len(p)) for p in prompts]
        except Exception as e:  # reported below
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.stop()
    assert not errors, (len(errors), errors[:3])
    assert len(results) == 1000 and all(results.values())


def test_client_retries_with_backoff_then_raises():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = RemoteReward(f"http://127.0.0.1:{port}", name="x", retries=2, backoff=0.1, timeout=2)
    t = time.monotonic()
    with pytest.raises(RewardError, match="failed after 3 attempts"):
        c(["a"], ["p"])
    assert time.monotonic() - t >= 0.1 + 0.2  # slept backoff * (1 + 2)


def test_cli_serve_reward_subprocess(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("rewards:\n  jpeg_compressibility: {weight: 1.0}\nhost: 127.0.0.1\nport: 0\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "serve-reward", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()  # "serving ... at http://127.0.0.1:PORT ..."
        assert "serving jpeg_compressibility" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        x = torch.rand(2, 3, 8, 8)
        got = RemoteReward(url)(x, ["a", "b"])
        torch.testing.assert_close(got["jpeg_compressibility"], build_reward("jpeg_compressibility")(x, ["a", "b"])["jpeg_compressibility"])
    finally:
        p.terminate()
        p.wait(timeout=20)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards:\n  jpeg_compressibility: 1.0\nhost: 0.0.0.0\nport: 0\n")
    r = subprocess.run([sys.executable, "-m", "flowrl.cli", "serve-reward", str(bad)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0 and "requires a bearer token" in r.stderr
