"""Atomic, verifiable, resumable checkpoints.

Layout under ``<out>/checkpoints/``::

    step_000120/model.safetensors   trainable weights (safetensors: nothing is unpickled on load)
    step_000120/trainer.pt          optimiser / scheduler / RNG states (loaded with weights_only=True)
    step_000120/meta.json           step, format, size and sha256 of the two files above, config fingerprint,
                                    free-form JSON state
    latest                          the name of the newest checkpoint written (a hint for people and tools;
                                    resume trusts only what verifies)

Writing: the files go into a temporary sibling directory; each is fsynced (and hashed from what was
written), ``meta.json`` last, then the directory itself; the directory is renamed into place and its
parent fsynced; ``latest`` is replaced the same way. A kill or a power cut at any moment leaves every
earlier checkpoint intact and never a half-written one under a final name.

Resuming (:func:`find_resumable`): checkpoints are tried newest first; one is used when ``meta.json``
parses, each file has the size and sha256 it records, the safetensors header is sound and the trainer
state unpickles with ``weights_only=True``. The ones passed over come back with the reason, so the
caller can name them. Checkpoints written before sizes and checksums were recorded (no ``files`` in
their meta) are checked for everything but the checksums.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"
FORMAT = 2  # 1: no "files" in meta.json (no sizes or checksums); 2: sizes and sha256 of every data file
MODEL, TRAINER, META = "model.safetensors", "trainer.pt", "meta.json"
DATA_FILES = (MODEL, TRAINER)
_STEP_DIR = re.compile(r"step_(\d+)")
_RESERVED = ("step", "format", "files")
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, or from another config. The message is one line."""


def config_fingerprint(config: dict, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the config as canonical JSON, without the top-level keys in ``ignore``."""
    data = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict


@dataclass(frozen=True)
class Skipped:
    """A checkpoint passed over on resume, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (created, renamed files) durable."""
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # a few file systems (some FUSE and network mounts) cannot sync a directory at all
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _seal(path: Path) -> dict:
    """fsync ``path`` and return its size and the sha256 of the bytes as read back from the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())
        size = f.tell()
    return {"size": size, "sha256": h.hexdigest()}


def _write_json_durable(path: Path, data: Any) -> None:
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
    """Write checkpoint ``step`` under ``root`` durably and atomically; keep the newest ``keep`` sound ones.

    model_state: name -> tensor (saved with safetensors; tensors are made contiguous, shared storage copied).
    trainer_state: tensors, numbers, strings, lists and dicts of them (optimiser ``state_dict()``, RNG states).
    meta: JSON-able extra state (e.g. the config fingerprint); the keys step, format and files are reserved.
    keep: checkpoints to keep (<= 0: keep all); see :func:`_prune` for which ones go.
    Cost: each data file is read back once (from the page cache) for its sha256, so the hash is of what the
    file holds rather than of what was meant to be written.
    """
    clash = sorted(set(meta or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_checkpoint: meta keys {clash} are reserved (reserved: {list(_RESERVED)})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, str(tmp / MODEL))
    torch.save(trainer_state, tmp / TRAINER)
    files = {f: _seal(tmp / f) for f in DATA_FILES}
    # meta.json last: a directory whose meta lists sizes and checksums had both data files complete and synced
    _write_json_durable(tmp / META, {**(meta or {}), "step": step, "format": FORMAT, "files": files})
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (after a resume past a damaged one): replace it whole
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_json_durable(root / LATEST, {"name": name})
    _fsync_dir(root)
    if keep > 0:
        _prune(root, final, keep)
    return final


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Delete the checkpoints older than the ``keep``-th newest sound one, counting ``newest`` (just written and
    sealed) as sound. A damaged checkpoint is never counted, so an older sound one outlives it, and the only
    sound checkpoint is never deleted. "Sound" here is the cheap check (sizes, headers; no checksums): pruning
    runs at every save and must not read whole checkpoints back. Leftovers of interrupted saves are removed
    too (a ``.old-`` directory only when its checkpoint is back in place)."""
    kept, cut = 0, None
    for c in reversed(list_checkpoints(root)):
        if c.path != newest:
            try:
                verify_checkpoint(c.path, checksums=False)
            except CheckpointError:
                continue
        kept += 1
        if kept == keep:
            cut = c.step
            break
    if cut is not None:
        for c in list_checkpoints(root):
            if c.step < cut:
                shutil.rmtree(c.path, ignore_errors=True)
    for d in root.glob(".tmp-step_*"):  # saves are sequential (one writing rank), so none is in flight now
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".old-step_*"):
        if (root / d.name[len(".old-"):].rsplit("-", 1)[0]).is_dir():
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Every ``step_N`` directory under ``root``, oldest first, sound or not (nothing is verified here).

    ``meta`` is the parsed ``meta.json``, or ``{}`` where it is missing or unreadable."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir():
            try:
                meta = json.loads((d / META).read_text())
            except (OSError, ValueError):
                meta = {}
            out.append(Checkpoint(path=d, step=int(m.group(1)), meta=meta if isinstance(meta, dict) else {}))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(root: str | Path) -> Optional[Checkpoint]:
    """The newest checkpoint directory under ``root``, damaged or not, or None: whether a run directory is
    in use. To resume, use :func:`find_resumable`, which verifies."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _one_line(e: BaseException) -> str:
    """A loader's message on one printable line (torch's carry terminal colour codes and paragraphs)."""
    text = " ".join(_CONTROL.sub("", str(e)).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def verify_checkpoint(path: str | Path, *, checksums: bool = True) -> Checkpoint:
    """The checkpoint in directory ``path`` if it is sound, else CheckpointError naming what is wrong.

    Sound: ``meta.json`` is a JSON object whose ``step`` matches the directory name; each data file exists,
    has the recorded size and (``checksums=True``) the recorded sha256; the safetensors header covers the
    file exactly; ``trainer.pt`` unpickles with ``weights_only=True`` (memory-mapped, so its tensors are not
    read). A checkpoint without recorded sizes (format 1) is checked for everything but sizes and checksums.
    """
    path = Path(path)
    m = _STEP_DIR.fullmatch(path.name)
    if m is None or not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (step_N)")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{META} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{META} does not parse ({_one_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] != int(m.group(1)):
        raise CheckpointError(f"{META} does not record step {int(m.group(1))}")
    fmt = meta.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise CheckpointError(f"{META} has format {fmt!r}; this flowrl reads formats up to {FORMAT}")
    files = meta.get("files") if fmt >= 2 else None
    if fmt >= 2 and not (isinstance(files, dict) and all(
            isinstance(files.get(f), dict) and isinstance(files[f].get("size"), int)
            and isinstance(files[f].get("sha256"), str) for f in DATA_FILES)):
        raise CheckpointError(f"{META} lacks the size and sha256 of {' and '.join(DATA_FILES)}")
    for f in DATA_FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"{f} is missing")
        if files is not None and (size := (path / f).stat().st_size) != files[f]["size"]:
            raise CheckpointError(f"{f} is {size} bytes, {META} records {files[f]['size']} (truncated or replaced)")
    try:
        with safe_open(str(path / MODEL), framework="pt") as st:
            st.keys()
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{MODEL} does not load ({_one_line(e)})") from None
    try:
        torch.load(path / TRAINER, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged zip (RuntimeError), a forbidden global (UnpicklingError), ...
        raise CheckpointError(f"{TRAINER} does not load with weights_only=True ({_one_line(e)})") from None
    if files is not None and checksums:
        for f in DATA_FILES:
            h = hashlib.sha256()
            with open(path / f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != files[f]["sha256"]:
                raise CheckpointError(f"{f} does not match its sha256 in {META} (its bytes changed after writing)")
    return Checkpoint(path=path, step=meta["step"], meta=meta)


def find_resumable(root: str | Path) -> tuple[Optional[Checkpoint], list[Skipped]]:
    """The newest checkpoint under ``root`` that verifies (:func:`verify_checkpoint`), and the newer ones skipped.

    Returns ``(None, [])`` when ``root`` holds no checkpoint at all. Raises CheckpointError (one line, naming
    ``root`` and each damaged checkpoint with its reason) when there are checkpoints but none verifies.
    Cost: each checkpoint tried is read once in full for its checksums.
    """
    root = Path(root)
    skipped: list[Skipped] = []
    for c in reversed(list_checkpoints(root)):
        try:
            return verify_checkpoint(c.path), skipped
        except CheckpointError as e:
            skipped.append(Skipped(c.path, str(e)))
    if skipped:
        why = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped)
        raise CheckpointError(f"no checkpoint under {root} verifies, cannot resume ({why})")
    return None, skipped


def load_checkpoint(ckpt: Checkpoint, *, fingerprint: Optional[str] = None, device: str | torch.device = "cpu"):
    """``(model_state, trainer_state, meta)`` of ``ckpt``; CheckpointError on a config mismatch or a file that
    does not load (pick ``ckpt`` with :func:`find_resumable`, which verifies)."""
    if fingerprint is not None and ckpt.meta.get("fingerprint") not in (None, fingerprint):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by a different config (fingerprint {ckpt.meta.get('fingerprint')} "
            f"!= {fingerprint}); resume with the same config, or choose a new --out directory"
        )
    try:
        dev = torch.device(device)  # the loaders name the CPU "cpu" only (an FSDP rank's device is "cpu:0")
        loc = "cpu" if dev.type == "cpu" else str(dev)
        model_state = load_file(str(ckpt.path / MODEL), device=loc)
        trainer_state = torch.load(ckpt.path / TRAINER, map_location=loc, weights_only=True)
    except Exception as e:  # damaged since it was chosen: one line, not a traceback from inside a loader
        raise CheckpointError(f"checkpoint {ckpt.path} does not load: {_one_line(e)}") from None
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


# ---------------------------------------------------------------------------------------------- sharded state
# Under FSDP2 (``fully_shard``) each trained parameter, its optimiser moments and its EMA shadow are DTensors
# holding one shard per rank. Checkpoints always hold FULL tensors (the same files as a one-process run, so a run
# can resume on another number of processes); these helpers gather before saving and re-shard after loading.
# Gathering is a collective: every rank calls it, with the same tensors in the same order.


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded tensors
        return None
    return DTensor


def is_sharded(tensors) -> bool:
    """Whether any of ``tensors`` is a sharded DTensor (the parameters of an FSDP2 module)."""
    dt = _dtensor_type()
    return dt is not None and any(isinstance(t, dt) for t in tensors)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor is all-gathered (collective), anything else is returned as it is."""
    dt = _dtensor_type()
    return t.full_tensor() if dt is not None and isinstance(t, dt) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``ref``: sharded over ``ref``'s mesh and placements when ``ref`` is a DTensor of the same
    shape (collective; the data of rank 0 is what every rank gets), else ``full`` unchanged."""
    dt = _dtensor_type()
    if dt is None or not isinstance(ref, dt) or tuple(full.shape) != tuple(ref.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements)


def full_optimizer_state(state: dict) -> dict:
    """An optimiser ``state_dict()`` with every DTensor in it gathered whole (collective)."""
    out = dict(state)
    out["state"] = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(s.items())}
                    for i, s in sorted(state["state"].items())}
    return out


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """The inverse of :func:`full_optimizer_state` for an optimiser over ``params`` (in its param-group order):
    each per-parameter tensor of the shape of its parameter is sharded like it (collective)."""
    out = dict(state)
    out["state"] = {i: {k: shard_like(v, params[int(i)]) if isinstance(v, torch.Tensor) else v
                        for k, v in sorted(s.items())}
                    for i, s in sorted(state["state"].items())}
    return out


def gather_state_dict(module: torch.nn.Module, keep: bool) -> Optional[dict[str, torch.Tensor]]:
    """``module``'s whole state dict on CPU where ``keep`` (the main process), None elsewhere. Under FSDP2 every
    rank must call it (each sharded tensor is all-gathered in turn, so one whole tensor at a time is on a device)."""
    out = {}
    for k, v in module.state_dict().items():
        v = full_tensor(v)
        if keep:
            out[k] = v.detach().cpu()
    return out if keep else None


def reshard(module: torch.nn.Module) -> None:
    """Drop the gathered weights that FSDP2 keeps after a forward pass with no backward (the root module does not
    reshard after its forward), so that the sharded parameters are again the ones the model uses: needed before
    their data is swapped (EMA), read (checkpoints) or updated. A no-op for a module that is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
