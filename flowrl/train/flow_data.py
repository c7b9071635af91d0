"""The flow task's prompts: the training and evaluation prompt sets and the reward metadata of each prompt.

``flow.prompt_file`` names the training prompts; ``flow.prompt_source`` says how to read it, a registered source
kind (:data:`PROMPT_SOURCES`; a plug-in adds one with :func:`register_prompt_source`), each a function
``(path, fc, *, split, key) -> rows`` with rows ``{"prompt": str, <other columns>}``. Built in:

- ``text``: one prompt per non-blank line (``.txt``);
- ``jsonl``: one JSON object per line (``.jsonl``); the prompt is column ``flow.prompt_column``;
- ``hf``: a Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk``, a local data file
  (``.json``/``.csv``/``.parquet``) or a hub id (cached for offline use); split ``flow.data_split``,
  ``load_dataset`` keywords ``flow.data_options``.

``auto`` (the default) picks the source whose registered suffixes hold the path's suffix, else the fallback
source (``hf``: folders and hub ids). The keys follow the LLM side (:mod:`flowrl.train.llm_data`):
``prompt_column``, ``data_split``, ``data_options``, ``dataset_size``, ``eval_size``.

Every column but the prompt reaches the rewards as ``meta`` (a dict of per-sample lists, one entry per scored
sample; a user's TRL-style reward gets them as keyword arguments), so a reward can read, e.g., a prompt's
category or reference caption. Evaluation prompts, first that is set: ``flow.eval_prompt_file`` (read like the
training file), ``flow.eval_split`` (another split of the ``hf`` training dataset), ``flow.eval_prompts``, else the
training prompts. ``flow.dataset_size`` / ``flow.eval_size`` keep the first rows (None: all). Relative paths are
read from the working directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from flowrl.core.registry import Registry

if TYPE_CHECKING:
    from flowrl.train.config import FlowConfig, TrainConfig

# name -> ``(path, fc, *, split, key) -> rows``; meta: suffixes (what ``auto`` picks it for), fallback (``auto``'s
# choice for a folder, a hub id or an unclaimed suffix), splits (whether flow.data_split / eval_split apply)
PROMPT_SOURCES = Registry("prompt source")


class PromptDataError(ValueError):
    """The prompt data cannot be read (a missing file, a row without its prompt, an empty set): one sentence naming
    the key, the file and the row; ``flowrl train`` prints it without a traceback."""


def register_prompt_source(name: str, *, suffixes: Sequence[str] = (), fallback: bool = False, splits: bool = False):
    """Decorator: register a prompt source ``fn(path, fc, *, split, key) -> [{"prompt": str, ...}]`` under
    ``name``; ``suffixes`` (e.g. ``(".txt",)``) are the files ``prompt_source: auto`` reads with it, ``fallback``
    makes it ``auto``'s choice for everything no suffix claims, ``splits`` says it reads ``flow.data_split``."""
    return PROMPT_SOURCES.register(name, suffixes=tuple(suffixes), fallback=fallback, splits=splits)


@dataclass
class PromptSet:
    """Prompts and the other columns of their rows. ``rows[i]`` is ``{"prompt": prompts[i], <columns>}``."""

    rows: list[dict[str, Any]]
    source: str = field(default="")  # where the prompts came from, for messages and the dry run

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def meta(self, index: Sequence[int]) -> Optional[dict[str, list]]:
        """The reward metadata of the prompts ``index`` (one entry per scored sample, repeats allowed): every
        column but the prompt as a list; None when the rows carry nothing else."""
        from flowrl.train.llm_data import row_meta

        return row_meta([self.rows[i] for i in index])

    def meta_of(self, prompts: Sequence[str]) -> Optional[dict[str, list]]:
        """:meth:`meta` of the rows holding ``prompts`` (by text; a prompt listed twice gets its first row's)."""
        first: dict[str, int] = {}
        for i, r in enumerate(self.rows):
            first.setdefault(r["prompt"], i)
        return self.meta([first[p] for p in prompts])


def resolve_source(fc: "FlowConfig", path: str) -> str:
    """The source kind that reads ``path``: ``flow.prompt_source``, or for ``auto`` the one registered for the
    path's suffix, else the fallback (folders, hub ids)."""
    if fc.prompt_source != "auto":
        return fc.prompt_source
    suffix = Path(path).suffix.lower()
    for name in PROMPT_SOURCES.names():
        if suffix and suffix in PROMPT_SOURCES.meta(name)["suffixes"]:
            return name
    fallbacks = [n for n in PROMPT_SOURCES.names() if PROMPT_SOURCES.meta(n)["fallback"]]
    if not fallbacks:
        raise ValueError(f"flow.prompt_source=auto: no prompt source reads {path!r} (suffix {suffix!r}); set "
                         f"flow.prompt_source to one of {PROMPT_SOURCES.names()}")
    return fallbacks[0]


def check_prompt_data(fc: "FlowConfig") -> None:
    """The prompt-data keys are consistent (read when the config is read; no file is opened). ValueError names
    the key."""
    valid = ["auto", *PROMPT_SOURCES.names()]
    if fc.prompt_source not in valid:
        raise ValueError(f"flow.prompt_source={fc.prompt_source!r} is not a registered prompt source; valid: {valid}")
    for key in ("dataset_size", "eval_size"):
        v = getattr(fc, key)
        if v is not None and v < 1:
            raise ValueError(f"flow.{key}={v}: must be >= 1 (or null: every row)")
    if fc.eval_prompt_file and fc.eval_split:
        raise ValueError(f"flow.eval_prompt_file={fc.eval_prompt_file!r} and flow.eval_split={fc.eval_split!r} both "
                         "name the evaluation prompts; give one")
    if (fc.eval_prompt_file or fc.eval_split) and fc.eval_prompts:
        raise ValueError("flow.eval_prompts is given as well as flow.eval_prompt_file / flow.eval_split; give one "
                         "source of evaluation prompts")
    if fc.eval_split:
        if not fc.prompt_file:
            raise ValueError(f"flow.eval_split={fc.eval_split!r} is a split of the dataset flow.prompt_file, which is not set")
        src = resolve_source(fc, fc.prompt_file)
        if not PROMPT_SOURCES.meta(src)["splits"]:
            raise ValueError(f"flow.eval_split={fc.eval_split!r}: the {src!r} source of flow.prompt_file="
                             f"{fc.prompt_file!r} has no splits; give flow.eval_prompt_file instead")


def read_prompt_file(fc: "FlowConfig", path: str, *, split: str, key: str) -> PromptSet:
    """The rows of ``path`` through its source (see :func:`resolve_source`); an empty result is an error."""
    src = resolve_source(fc, path)
    try:
        rows = PROMPT_SOURCES[src](path, fc, split=split, key=key)
    except PromptDataError:
        raise
    except ValueError as e:  # the readers' own (JSON lines, datasets) already name the file and the line
        raise PromptDataError(str(e)) from None
    if not rows:
        raise PromptDataError(f"{key} {str(path)!r} holds no prompt (source {src!r})")
    return PromptSet(rows, source=f"{key}={path} ({src})")


def load_prompt_sets(cfg: "TrainConfig") -> tuple[Optional[PromptSet], Optional[PromptSet]]:
    """(training prompts, evaluation prompts) of ``cfg.flow`` (module docstring); None where the config names
    none (training: the adapter's default prompts; evaluation: the training prompts)."""
    fc = cfg.flow
    check_prompt_data(fc)
    if fc.prompt_file:
        train: Optional[PromptSet] = read_prompt_file(fc, fc.prompt_file, split=fc.data_split, key="flow.prompt_file")
    elif fc.prompts:
        train = PromptSet([{"prompt": p} for p in fc.prompts], source="flow.prompts")
    else:
        train = None
    if fc.eval_prompt_file:
        ev: Optional[PromptSet] = read_prompt_file(fc, fc.eval_prompt_file, split=fc.data_split,
                                                   key="flow.eval_prompt_file")
    elif fc.eval_split:
        ev = read_prompt_file(fc, fc.prompt_file, split=fc.eval_split, key="flow.eval_split")
    elif fc.eval_prompts:
        ev = PromptSet([{"prompt": p} for p in fc.eval_prompts], source="flow.eval_prompts")
    else:
        ev = None
    if train is not None and fc.dataset_size is not None:
        train.rows = train.rows[: fc.dataset_size]
    if ev is not None and fc.eval_size is not None:
        ev.rows = ev.rows[: fc.eval_size]
    return train, ev


# ---------------------------------------------------------------------------------------------- built-in sources
def _local_file(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptDataError(f"{key} {str(path)!r} does not exist (relative paths are read from the working "
                                f"directory {Path.cwd()})")
    return p


def records_to_rows(records: list[dict], column: str, where: str) -> list[dict]:
    """Dataset records -> rows: the prompt from ``column`` (a non-empty string), every other column as it is."""
    rows = []
    for i, rec in enumerate(records):
        if column not in rec:
            raise PromptDataError(f"{where} row {i}: no prompt column {column!r} (flow.prompt_column); columns: {sorted(rec)}")
        p = rec[column]
        if not isinstance(p, str) or not p.strip():
            raise PromptDataError(f"{where} row {i}: the prompt column {column!r} holds {p!r}; it must be a non-empty string")
        row = {"prompt": p.strip()}
        if "prompt" in rec and column != "prompt":
            raise PromptDataError(f"{where} row {i}: a column 'prompt' besides the prompt column {column!r}; rename one "
                             "(the rewards receive the prompt as `prompts`)")
        row.update({k: v for k, v in rec.items() if k != column})
        rows.append(row)
    return rows


@register_prompt_source("text", suffixes=(".txt",))
def text_prompts(path: str, fc: "FlowConfig", *, split: str, key: str) -> list[dict]:
    """One prompt per non-blank line, stripped (no metadata)."""
    lines = _local_file(path, key).read_text(encoding="utf-8").splitlines()
    return [{"prompt": s.strip()} for s in lines if s.strip()]


@register_prompt_source("jsonl", suffixes=(".jsonl",))
def jsonl_prompts(path: str, fc: "FlowConfig", *, split: str, key: str) -> list[dict]:
    """One JSON object per line; the prompt is column ``flow.prompt_column``, the others are metadata."""
    from flowrl.train.llm_data import read_jsonl

    _local_file(path, key)
    return records_to_rows(read_jsonl(path, key=key), fc.prompt_column, path)


@register_prompt_source("hf", suffixes=(".json", ".csv", ".parquet"), fallback=True, splits=True)
def hf_prompts(path: str, fc: "FlowConfig", *, split: str, key: str) -> list[dict]:
    """Split ``split`` of a ``datasets`` dataset (a ``save_to_disk`` folder, a local data file, or a hub id read
    from the cache offline); the prompt is column ``flow.prompt_column``."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{key}={path!r} is read with the `datasets` package: pip install datasets (or give a .txt "
                         "or .jsonl file)")
    from flowrl.train.llm_data import _hf_records

    return records_to_rows(_hf_records(path, split, dict(fc.data_options), key), fc.prompt_column, path)

