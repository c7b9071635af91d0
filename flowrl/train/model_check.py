"""Where a training config's model is, without loading it: a local folder, the Hugging Face cache
(``try_to_load_from_cache``) or the hub (``model_info`` with a short timeout; a gated repository checked with
``auth_check``); ``HF_HUB_OFFLINE=1`` means the cache only. Every failure is one :class:`PreflightError` sentence:
which model (its config key), why it is not usable, what to do (`huggingface-cli login`, a local path).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

HUB_TIMEOUT_S = 5.0
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PreflightError(Exception):
    """A check failed; the message is one sentence: what, why, what to do."""


# --------------------------------------------------------------------------------------------- model location
def _offline() -> bool:
    from flowrl.rewards.base import hub_offline

    return hub_offline()


def _cached_dir(repo: str, filename: str) -> Optional[Path]:
    """The cache snapshot folder holding ``filename`` of hub model ``repo``, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(repo, filename)
    except Exception:  # an id the hub refuses (HFValidationError) is simply not cached
        return None
    return Path(p).parent if isinstance(p, str) else None


def model_dir(ref: str, index_file: str, key: str, how: str) -> Path:
    """The local folder (or cache snapshot) of model ``ref`` holding ``index_file``; PreflightError when the model
    is not usable, naming ``key``, the reason and ``how`` to fix it. A model on the hub but not in the cache
    raises nothing it can read a config from: :class:`ModelNotLocal`."""
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / index_file).is_file():
            raise PreflightError(f"{key}={ref!r} is a local path without {index_file}: give the folder that "
                                 f"save_pretrained wrote ({how})")
        return p
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise PreflightError(f"{key}={ref!r}: no such local folder (relative to {Path.cwd()}) and not a hub id; {how}")
    d = _cached_dir(ref, index_file)
    if d is not None:
        return d
    if _offline():
        raise PreflightError(f"{key}={ref!r} is not in the Hugging Face cache and the hub is off (HF_HUB_OFFLINE=1): "
                             f"download it once where there is network (`huggingface-cli download {ref}`), or {how}")
    raise ModelNotLocal(hub_status(ref, key, how))


class ModelNotLocal(Exception):
    """The model is on the hub (reachable) but not local: no config to read without downloading."""


def hub_status(ref: str, key: str, how: str) -> str:
    """One sentence on ``ref`` on the hub (reachable, size, gated and accessible), or PreflightError."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(ref, timeout=HUB_TIMEOUT_S, files_metadata=False)
    except Exception as e:
        names = {c.__name__ for c in type(e).__mro__}
        if "GatedRepoError" in names:
            raise PreflightError(f"{key}={ref!r} is gated: accept its license on https://huggingface.co/{ref} and log "
                                 f"in (`huggingface-cli login`), or {how}") from None
        if names & {"RepositoryNotFoundError", "HfHubHTTPError"}:
            raise PreflightError(f"{key}={ref!r} is not on the Hugging Face hub (or private: `huggingface-cli login`); "
                                 f"check the id, or {how}") from None
        raise PreflightError(f"{key}={ref!r} is not cached and the hub is not reachable ({type(e).__name__}): connect, "
                             f"or download it where there is network and {how}") from None
    if getattr(info, "gated", False):
        try:
            from huggingface_hub import auth_check

            auth_check(ref)
        except Exception as e:
            raise PreflightError(f"{key}={ref!r} is gated and this account has no access ({type(e).__name__}): accept "
                                 f"its license on https://huggingface.co/{ref} and `huggingface-cli login`, or {how}") from None
    return f"{ref} is on the hub (not cached: it downloads on first use; the estimate needs its config files)"



def family(cfg) -> str:
    """"flow" or "llm": the family of the config's registered algorithm."""
    from flowrl.train.algorithms import ALGORITHMS

    return getattr(ALGORITHMS[cfg.algorithm], "family", "flow")


def model_ref(cfg) -> tuple[Optional[str], str, str]:
    """(hub id or folder of the model, or None for an adapter's own weights; its config key; what to do)."""
    if family(cfg) == "flow":
        return (cfg.flow.model_path, "flow.model_path",
                "log in (`huggingface-cli login`) for a gated model, or set flow.model_path to a local diffusers folder")
    from flowrl.pipelines.registry import PIPELINES

    lc = cfg.llm
    how = "log in (`huggingface-cli login`) for a gated model, or set llm.model to a local folder"
    if lc.model in PIPELINES:
        return lc.model_path, "llm.model_path", how
    return lc.model, "llm.model", how
