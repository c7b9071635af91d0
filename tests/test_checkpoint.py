"""Checkpoints: atomic and durable writes (every file fsynced), sizes and checksums in meta.json, resume from
the newest checkpoint that verifies past damaged ones, retention that never drops the last sound one."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowrl.train.checkpoint import (
    CheckpointError, config_fingerprint, find_resumable, latest_checkpoint, list_checkpoints, load_checkpoint,
    rng_state, save_checkpoint, set_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]


def _save(root, step, w, keep=2):
    return save_checkpoint(root, step, model_state={"w": w}, trainer_state={"opt": {"m": w * 2, "step": step}},
                           meta={"fingerprint": "abc"}, keep=keep)


def _two(root):
    """Steps 1 and 2, weights all 1.0 and all 2.0."""
    _save(root, 1, torch.full((64,), 1.0))
    return _save(root, 2, torch.full((64,), 2.0))


def _resume(root):
    """What --resume does: pick the newest checkpoint that verifies, then load it."""
    ck, skipped = find_resumable(root)
    model, trainer, meta = load_checkpoint(ck, fingerprint="abc")
    return ck.step, model["w"], trainer, skipped


def _truncate(path, keep_bytes=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep_bytes is None else keep_bytes])


# -------------------------------------------------------------------------------- round trip, config check


def test_roundtrip_keep_and_latest(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s, torch.full((3,), float(s)))
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3]  # keep=2
    assert json.loads((tmp_path / "latest").read_text()) == {"name": "step_000003"}
    ck = latest_checkpoint(tmp_path)
    model, trainer, meta = load_checkpoint(ck, fingerprint="abc")
    assert ck.step == 3 and torch.equal(model["w"], torch.full((3,), 3.0))
    assert torch.equal(trainer["opt"]["m"], torch.full((3,), 6.0)) and trainer["opt"]["step"] == 3
    assert find_resumable(tmp_path)[0].step == 3 and find_resumable(tmp_path / "none") == (None, [])


def test_meta_records_each_files_size_and_sha256(tmp_path):
    path = _save(tmp_path, 7, torch.arange(10.0))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["format"] == 2 and meta["fingerprint"] == "abc"
    for name in ("model.safetensors", "trainer.pt"):
        data = (path / name).read_bytes()
        assert meta["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 8, model_state={}, trainer_state={}, meta={"files": {}})


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, torch.ones(2))
    import flowrl.train.checkpoint as ck_mod

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ck_mod.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, torch.zeros(2))
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]  # the half-written one is not under a final name
    assert find_resumable(tmp_path)[0].step == 1
    monkeypatch.undo()
    _save(tmp_path, 2, torch.zeros(2))
    assert not list(tmp_path.glob(".tmp-*"))  # the next save clears the leftover


def test_other_config_is_refused(tmp_path):
    _save(tmp_path, 1, torch.ones(2))
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(latest_checkpoint(tmp_path), fingerprint="zzz")
    assert config_fingerprint({"a": 1, "b": 2}, ignore=("b",)) == config_fingerprint({"a": 1, "b": 3}, ignore=("b",))
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})


def test_rng_state_roundtrip(tmp_path):
    import random

    st = rng_state()
    save_checkpoint(tmp_path, 1, model_state={}, trainer_state={"rng": st})
    a = (torch.rand(3), random.random())
    _, trainer, _ = load_checkpoint(latest_checkpoint(tmp_path))
    set_rng_state(trainer["rng"])
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# -------------------------------------------------------------------------------- durability


def test_every_file_and_directory_is_fsynced_before_the_rename_and_after_latest(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    root = tmp_path / "ck"
    final = _save(root, 3, torch.ones(4))
    tmp = [Path(p) for p in synced if Path(p).name.startswith(".tmp-step_000003")]
    assert len(tmp) == 1, synced  # the temporary directory is synced once, after its files
    tmp = str(tmp[0])
    order = [tmp + "/model.safetensors", tmp + "/trainer.pt", tmp + "/meta.json.tmp", tmp, str(root),
             str(root / "latest.tmp"), str(root)]
    assert synced == order, synced  # data files, meta, directory; rename; parent; latest; parent
    assert final.is_dir() and not Path(tmp).exists()


# -------------------------------------------------------------------------------- resume past damage


def test_resume_past_a_truncated_newest_model(tmp_path):
    newest = _two(tmp_path)
    _truncate(newest / "model.safetensors")
    step, w, trainer, skipped = _resume(tmp_path)
    assert step == 1 and torch.equal(w, torch.full((64,), 1.0)) and trainer["opt"]["step"] == 1
    assert [s.path.name for s in skipped] == ["step_000002"]
    assert "model.safetensors" in skipped[0].reason and "bytes" in skipped[0].reason


def test_resume_past_garbage_in_the_newest_meta(tmp_path):
    newest = _two(tmp_path)
    (newest / "meta.json").write_text("{\x00garbage")
    step, w, _, skipped = _resume(tmp_path)
    assert step == 1 and torch.equal(w, torch.full((64,), 1.0))
    assert [s.path.name for s in skipped] == ["step_000002"] and "meta.json does not parse" in skipped[0].reason


def test_resume_past_a_missing_trainer_state_names_it(tmp_path):
    newest = _two(tmp_path)
    (newest / "trainer.pt").unlink()
    step, _, _, skipped = _resume(tmp_path)
    assert step == 1 and [(s.path.name, s.reason) for s in skipped] == [("step_000002", "trainer.pt is missing")]


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt"])
def test_a_same_size_bit_flip_is_caught_by_the_checksum(tmp_path, name):
    newest = _two(tmp_path)
    f = newest / name
    data = bytearray(f.read_bytes())
    # a byte of a stored tensor, so both files stay loadable: model w = 2.0, trainer m = 4.0 (float32)
    at = bytes(data).index(torch.tensor([2.0 if name == "model.safetensors" else 4.0]).numpy().tobytes())
    data[at] ^= 0x01
    f.write_bytes(bytes(data))
    step, w, trainer, skipped = _resume(tmp_path)
    assert step == 1 and torch.equal(w, torch.full((64,), 1.0)) and torch.equal(trainer["opt"]["m"], 2 * w)
    assert [s.path.name for s in skipped] == ["step_000002"] and "sha256" in skipped[0].reason


def test_trainer_state_that_needs_more_than_weights_only_is_skipped(tmp_path):
    import argparse

    newest = _two(tmp_path)
    torch.save({"opt": argparse.Namespace(x=1)}, newest / "trainer.pt")  # a pickled object, not plain state
    _drop_checksums(newest)
    step, _, _, skipped = _resume(tmp_path)
    assert step == 1 and "weights_only" in skipped[0].reason


def test_none_verifies_is_a_one_line_error_naming_the_directory(tmp_path):
    _two(tmp_path)
    _truncate(tmp_path / "step_000002" / "model.safetensors")
    (tmp_path / "step_000001" / "meta.json").write_text("not json")
    with pytest.raises(CheckpointError) as e:
        _resume(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "no checkpoint" in msg
    assert "step_000002: model.safetensors" in msg and "step_000001: meta.json" in msg


# -------------------------------------------------------------------------------- older checkpoints, retention


def _drop_checksums(path):
    """Rewrite ``meta.json`` as the previous version wrote it (step and caller's meta; no format, no files)."""
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("format", "files")}))


def _save_previous_version(root, step, w):
    """A checkpoint exactly as the previous version wrote it: no sizes or checksums in meta.json."""
    d = Path(root) / f"step_{step:06d}"
    d.mkdir(parents=True)
    save_file({"w": w.contiguous()}, str(d / "model.safetensors"))
    torch.save({"opt": {"m": w * 2, "step": step}}, d / "trainer.pt")
    (d / "meta.json").write_text(json.dumps({"step": step, "fingerprint": "abc"}, indent=1, sort_keys=True))
    (Path(root) / "latest").write_text(json.dumps({"name": d.name}))


def test_checkpoints_of_the_previous_version_still_load_and_are_checked(tmp_path):
    _save_previous_version(tmp_path, 1, torch.full((64,), 1.0))
    _save_previous_version(tmp_path, 2, torch.full((64,), 2.0))
    step, w, _, skipped = _resume(tmp_path)
    assert step == 2 and torch.equal(w, torch.full((64,), 2.0)) and skipped == []
    _truncate(tmp_path / "step_000002" / "model.safetensors")  # no size recorded: the header check sees it
    step, w, _, skipped = _resume(tmp_path)
    assert step == 1 and "model.safetensors does not load" in skipped[0].reason
    _save(tmp_path, 3, torch.full((64,), 3.0))  # a new save beside old ones keeps working (and prunes)
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 2, 3] and _resume(tmp_path)[0] == 3


def test_retention_keeps_an_older_sound_checkpoint_past_a_damaged_one(tmp_path):
    _two(tmp_path)
    _truncate(tmp_path / "step_000002" / "model.safetensors")
    _save(tmp_path, 3, torch.full((64,), 3.0), keep=2)
    # keep=2 sound ones: 3 and 1; the damaged 2 between them is left for a later save to clear
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 2, 3]
    (tmp_path / "step_000003" / "meta.json").write_text("")  # 3 damaged as well: 1 is still there
    step, _, _, skipped = _resume(tmp_path)
    assert step == 1 and [s.path.name for s in skipped] == ["step_000003", "step_000002"]
    _save(tmp_path, 4, torch.full((64,), 4.0), keep=2)
    _save(tmp_path, 5, torch.full((64,), 5.0), keep=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]  # damaged ones older than the kept go


def test_retention_never_deletes_the_only_sound_checkpoint(tmp_path):
    _save(tmp_path, 1, torch.full((64,), 1.0), keep=1)
    _save(tmp_path, 5, torch.full((64,), 5.0), keep=1)
    _truncate(tmp_path / "step_000005" / "trainer.pt")
    _save(tmp_path, 2, torch.full((64,), 2.0), keep=1)  # the only sound one; the damaged 5 is newer
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 5]  # a damaged checkpoint does not count as kept
    step, w, _, skipped = _resume(tmp_path)
    assert step == 2 and torch.equal(w, torch.full((64,), 2.0)) and [s.path.name for s in skipped] == ["step_000005"]


# -------------------------------------------------------------------------------- through the training loop

TINY_ARITH = ["prompts_per_iter=2", "group_size=4", "eval.every=100", "llm.eval_size=8", "llm.dataset_size=64",
              "progress=false", "trackers=[]", "save_every=1", "max_minutes=0", "eval.pass_problems=0"]


def test_train_resumes_past_a_truncated_newest_checkpoint_and_names_it(tmp_path, capfd):
    """configs/arith/grpo.yaml, 2 iterations saved at 1 and 2; step 2's weights truncated; --resume to 3 goes back
    to step 1, says so, and recomputes step 2 bit for bit."""
    from flowrl.config import load
    from flowrl.train.config import TrainConfig
    from flowrl.train.loop import train
    from flowrl.train.metrics_log import read_metrics

    cfg = lambda n: load(TrainConfig, ROOT / "configs/arith/grpo.yaml", TINY_ARITH + [f"iterations={n}"])
    out = tmp_path / "run"
    train(cfg(2), out)
    step2 = out / "checkpoints" / "step_000002" / "model.safetensors"
    good = step2.read_bytes()
    _truncate(step2)
    capfd.readouterr()
    train(cfg(3), out, resume=True)
    err = capfd.readouterr().err
    assert "step_000002" in err and "model.safetensors" in err, err
    assert step2.read_bytes() == good  # re-trained from step 1 to the same weights
    assert find_resumable(out / "checkpoints")[0].step == 3
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2, 3]


def test_cli_resume_with_no_sound_checkpoint_is_one_line_without_traceback(tmp_path):
    """Checked before any model is built: runs in a second."""
    ck = tmp_path / "run" / "checkpoints"
    _two(ck)
    for d in ("step_000001", "step_000002"):
        _truncate(ck / d / "trainer.pt")
    r = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs/arith/grpo.yaml"),
                        "--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(ck) in r.stderr and "step_000002: trainer.pt" in r.stderr
