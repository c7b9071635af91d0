"""Atomic, resumable checkpoints.

Layout under ``<out>/checkpoints/``::

    step_000120/model.safetensors   trainable weights (safetensors: nothing is unpickled on load)
    step_000120/trainer.pt          optimiser / scheduler / RNG states (loaded with weights_only=True)
    step_000120/meta.json           step, config fingerprint, free-form JSON state
    latest                          the name of the newest complete checkpoint

A checkpoint is written into a temporary sibling directory and renamed into place, and ``latest`` is
replaced atomically after that, so a kill at any moment leaves the previous checkpoint intact and
never a half-written one under a final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, or from another config."""


def config_fingerprint(config: dict, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the config as canonical JSON, without the top-level keys in ``ignore``."""
    data = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path, step: int, *, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
    meta: Optional[dict] = None, keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` ones.

    model_state: name -> tensor (saved with safetensors; tensors are made contiguous, shared storage copied).
    trainer_state: tensors, numbers, strings, lists and dicts of them (optimiser ``state_dict()``, RNG states).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    _write_json_atomic(tmp / "meta.json", {"step": step, **(meta or {})})
    if final.exists():  # re-saving the same step (after a resume): replace it whole
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _write_json_atomic(root / LATEST, {"name": name})
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root`` (model, trainer state and meta present), oldest first."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.glob("step_*")):
        files = [d / "model.safetensors", d / "trainer.pt", d / "meta.json"]
        if all(f.is_file() for f in files):
            meta = json.loads((d / "meta.json").read_text())
            out.append(Checkpoint(path=d, step=int(meta["step"]), meta=meta))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(root: str | Path) -> Optional[Checkpoint]:
    """The newest complete checkpoint (the ``latest`` pointer if valid, else the highest step), or None."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    pointer = Path(root) / LATEST
    if pointer.is_file():
        name = json.loads(pointer.read_text()).get("name")
        for c in ckpts:
            if c.path.name == name:
                return c
    return ckpts[-1]


def load_checkpoint(ckpt: Checkpoint, *, fingerprint: Optional[str] = None, device: str | torch.device = "cpu"):
    """``(model_state, trainer_state, meta)`` of ``ckpt``; raises CheckpointError on a config mismatch."""
    if fingerprint is not None and ckpt.meta.get("fingerprint") not in (None, fingerprint):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by a different config (fingerprint {ckpt.meta.get('fingerprint')} "
            f"!= {fingerprint}); resume with the same config, or choose a new --out directory"
        )
    model_state = load_file(str(ckpt.path / "model.safetensors"), device=str(device))
    trainer_state = torch.load(ckpt.path / "trainer.pt", map_location=device, weights_only=True)
    return model_state, trainer_state, ckpt.meta


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA when present, python's random) in a weights_only-loadable form."""
    import random

    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                          "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(st["torch"].cpu() if hasattr(st["torch"], "cpu") else st["torch"])
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
