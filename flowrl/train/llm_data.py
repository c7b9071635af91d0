"""The LLM task's data: the training and evaluation problems, their reward metadata, and the merge of the
reward metrics of several scoring calls.

``llm.dataset`` names a registered dataset kind (:data:`DATASETS`; a plug-in adds one with
:func:`register_dataset`): a function ``(cfg: TrainConfig) -> (train rows, eval rows)``. Built in:

- ``arithmetic``: the embedded arithmetic problems (rows ``{"prompt"}``); its verifier is the ``arithmetic`` reward.
- ``reasoning_gym``: a reasoning-gym task (rows with the task's ``entry``; reward ``reasoning_gym``).
- ``jsonl``: a JSON-lines file ``llm.data_path``, one object per line.
- ``hf``: a Hugging Face ``datasets`` dataset: a hub id (cached for offline use), a folder written by
  ``save_to_disk``, or a local data file (``.jsonl``/``.json``/``.csv``/``.parquet``); ``llm.data_split`` and
  ``llm.data_options`` (``load_dataset``'s keywords: ``name``, ``data_dir``, ``revision``, ``cache_dir``, ...).

A row of a file dataset is ``{"prompt": ..., "answer": ..., "tests": ..., <every other column>}``: the prompt is
column ``llm.prompt_column`` (a string, or a chat conversation ``[{"role", "content"}]`` when
``llm.chat_template`` is on), formatted with ``llm.template`` (``{column}`` fields) when one is given; columns
``llm.answer_column`` / ``llm.tests_column`` arrive as ``answer`` / ``tests`` (what ``math_verify`` and
``code_tests`` read). Every column but the prompt reaches the rewards in ``meta`` (a user's TRL-style reward
gets them as keyword arguments). The evaluation rows are ``llm.eval_data`` (a second JSONL file, or a split of
the HF dataset) or else a fixed ``llm.eval_fraction`` of the file's rows, held out of training. At most
``llm.dataset_size`` training rows and ``llm.eval_size`` evaluation rows are used (the first ones).
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from flowrl.core.registry import Registry

if TYPE_CHECKING:
    from flowrl.train.config import LLMConfig, TrainConfig

# the evaluation set of a reasoning-gym task is drawn with this seed offset from eval.seed (apart from training)
EVAL_SEED_OFFSET = 10_000_019
# the held-out fraction of a file dataset is drawn with this seed: the same rows whatever llm.data_seed is
SPLIT_SEED = 20_240_607

# name -> ``(cfg) -> (train rows, eval rows)``; meta: default_reward (the dataset's own verifier, or None),
# check (``(llm config) -> None``, raising ValueError: the dataset's own keys, checked when the config is read)
DATASETS = Registry("LLM dataset")


def register_dataset(name: str, *, default_reward: Optional[str] = None,
                     check: Optional[Callable[["LLMConfig"], None]] = None):
    """Decorator: register a dataset kind ``fn(cfg) -> (train rows, eval rows)`` under ``name``; rows are dicts
    with a ``"prompt"``, their other keys go to the rewards as meta. ``default_reward``: the registered reward
    used when ``llm.rewards`` is empty (None: the config must name one); ``check``: the config's checks."""
    return DATASETS.register(name, default_reward=default_reward, check=check)


def check_llm_data(cfg: "TrainConfig") -> None:
    """``llm.dataset`` is registered, its own keys are consistent, and rewards exist for it. ValueError names the key."""
    lc = cfg.llm
    if lc.dataset not in DATASETS:
        raise ValueError(f"llm.dataset={lc.dataset!r} is not a registered dataset; valid: {DATASETS.names()}")
    meta = DATASETS.meta(lc.dataset)
    if meta.get("check") is not None:
        meta["check"](lc)
    if not lc.rewards and meta.get("default_reward") is None:
        raise ValueError(f"llm.dataset={lc.dataset!r} has no verifier of its own: give llm.rewards, e.g. "
                         "{math_verify: {weight: 1.0}}, {code_tests: {weight: 1.0}} or your own 'file.py:function'")


def load_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of ``cfg.llm.dataset`` (see the module docstring)."""
    check_llm_data(cfg)
    train, ev = DATASETS[cfg.llm.dataset](cfg)
    for what, rows in (("training", train), ("evaluation", ev)):
        if not rows:
            raise ValueError(f"llm.dataset={cfg.llm.dataset!r}: the {what} set is empty")
    return train, ev


def default_rewards(cfg: "TrainConfig") -> dict:
    """The outcome rewards of ``cfg.llm`` (``llm.rewards``, or the dataset's own verifier when empty)."""
    lc = cfg.llm
    if lc.rewards:
        return dict(lc.rewards)
    name = DATASETS.meta(lc.dataset).get("default_reward")
    if name is None:
        raise ValueError(f"llm.dataset={lc.dataset!r} has no verifier of its own: give llm.rewards")
    return {name: {"weight": 1.0}}


def row_meta(rows: list[dict]) -> Optional[dict]:
    """The reward metadata of ``rows``: every key but ``"prompt"`` as a list with one entry per row (None for rows
    that carry nothing else, like the arithmetic problems)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "prompt"))  # every row's columns, in order
    if not keys:
        return None
    return {k: [r.get(k) for r in rows] for k in keys}


def merge_reward_metrics(items: list[tuple[int, dict]]) -> dict[str, float]:
    """Reward metrics of several scored chunks ``[(rows, metrics)]``: invalid counts add up, means are weighted
    by rows (NaN where no chunk has a finite value)."""
    out: dict[str, float] = {}
    keys = {k for _, m in items for k in m}
    for k in sorted(keys):
        vals = [(n, m[k]) for n, m in items if k in m]
        if k.endswith("invalid"):
            out[k] = float(sum(v for _, v in vals))
        else:
            fin = [(n, v) for n, v in vals if math.isfinite(v)]
            out[k] = sum(n * v for n, v in fin) / sum(n for n, _ in fin) if fin else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- built-in kinds
@register_dataset("arithmetic", default_reward="arithmetic")
def arithmetic_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """``dataset_size`` training problems drawn with ``data_seed``, ``eval_size`` held-out ones with ``eval.seed``."""
    from flowrl.pipelines.arithmetic import make_problems, prompt_text

    lc = cfg.llm
    train = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.dataset_size, split="train",
                                                                       seed=lc.data_seed, digits=lc.digits)]
    ev = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.eval_size, split="heldout",
                                                                    seed=cfg.eval.seed, digits=lc.digits)]
    return train, ev


@register_dataset("reasoning_gym", default_reward="reasoning_gym")
def reasoning_gym_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """A reasoning-gym task: ``dataset_size`` problems of seed ``data_seed``, ``eval_size`` of another seed."""
    from flowrl.rewards.reasoning_gym_tasks import DEFAULT_TEMPLATE, make_task_dataset

    lc = cfg.llm
    tpl, fmt = lc.template or DEFAULT_TEMPLATE, lc.prompt_format
    train = make_task_dataset(lc.task, size=lc.dataset_size, seed=lc.data_seed, template=tpl, prompt_format=fmt,
                              **lc.task_options)
    ev = make_task_dataset(lc.task, size=lc.eval_size, seed=EVAL_SEED_OFFSET + cfg.eval.seed, template=tpl,
                           prompt_format=fmt, **lc.task_options)
    return train, ev


def _check_file_data(lc: "LLMConfig", kind: str) -> None:
    if not lc.data_path:
        raise ValueError(f"llm.dataset={kind} needs llm.data_path (the {'JSONL file' if kind == 'jsonl' else 'dataset'})")
    if kind == "jsonl":
        for key in ("data_path", "eval_data"):
            p = getattr(lc, key)
            if p is not None and not Path(p).expanduser().is_file():
                raise ValueError(f"llm.{key}={p!r}: no such file (paths are relative to the working directory "
                                 f"{Path.cwd()})")
        if lc.data_options:
            raise ValueError(f"llm.data_options={lc.data_options} are load_dataset's keywords (dataset=hf); "
                             "a JSONL file takes none")
    if lc.template is not None and "{" not in lc.template:
        raise ValueError(f"llm.template={lc.template!r} has no {{column}} field; the prompt would ignore the data")


def _check_jsonl(lc: "LLMConfig") -> None:
    _check_file_data(lc, "jsonl")


def _check_hf(lc: "LLMConfig") -> None:
    import importlib.util

    _check_file_data(lc, "hf")
    if importlib.util.find_spec("datasets") is None:
        raise ValueError("llm.dataset=hf needs the `datasets` package: pip install datasets "
                         "(or give a JSON-lines file with llm.dataset=jsonl)")


def read_jsonl(path: str, key: str = "llm.data_path") -> list[dict]:
    """The objects of a JSON-lines file, one per non-blank line (errors name the file and the line)."""
    rows = []
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}={path!r} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{key}={path!r} line {n}: a {type(obj).__name__}, not an object {{column: value}}")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{key}={path!r} holds no rows")
    return rows


def _is_conversation(p: Any) -> bool:
    return isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p)


def to_rows(records: list[dict], lc: "LLMConfig", where: str) -> list[dict]:
    """Dataset records -> task rows: the prompt (formatted with ``llm.template``), ``answer`` / ``tests`` from
    their configured columns, every other column as it is."""
    rename = {lc.answer_column: "answer", lc.tests_column: "tests"}
    out = []
    for i, rec in enumerate(records):
        if lc.prompt_column not in rec:
            raise ValueError(f"{where} row {i}: no prompt column {lc.prompt_column!r} (llm.prompt_column); "
                             f"columns: {sorted(rec)}")
        if lc.template is not None:
            try:
                prompt = lc.template.format_map(rec)
            except (KeyError, IndexError, AttributeError, ValueError) as e:
                raise ValueError(f"llm.template={lc.template!r}: {where} row {i}: {type(e).__name__}: {e}; "
                                 f"columns: {sorted(rec)}") from None
        else:
            prompt = rec[lc.prompt_column]
        if not isinstance(prompt, str) and not (_is_conversation(prompt) and lc.chat_template):
            raise ValueError(f"{where} row {i}: the prompt is a {type(prompt).__name__}; give a string, or a chat "
                             "conversation [{role, content}, ...] with llm.chat_template: true")
        row: dict[str, Any] = {"prompt": prompt}
        for k, v in rec.items():
            if k == lc.prompt_column:
                continue
            name = rename.get(k, k)
            if name in row and name != k:
                raise ValueError(f"{where} row {i}: column {k!r} becomes {name!r}, which the data already has")
            row[name] = v
        out.append(row)
    return out


def _split(rows: list[dict], lc: "LLMConfig", where: str) -> tuple[list[dict], list[dict]]:
    """Hold out a fixed ``eval_fraction`` of ``rows`` (at least one row, at least one left for training)."""
    n = len(rows)
    k = max(1, round(lc.eval_fraction * n))
    if n < 2 or k >= n:
        raise ValueError(f"{where}: {n} rows cannot be split with llm.eval_fraction={lc.eval_fraction}; give more "
                         "rows or llm.eval_data")
    held = set(random.Random(SPLIT_SEED).sample(range(n), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _limit(train: list[dict], ev: list[dict], lc: "LLMConfig", where: str) -> tuple[list[dict], list[dict]]:
    if len(train) > lc.dataset_size:
        warnings.warn(f"{where}: llm.dataset_size={lc.dataset_size} keeps the first {lc.dataset_size} of "
                      f"{len(train)} training rows; raise it to train on all", stacklevel=3)
    return train[: lc.dataset_size], ev[: lc.eval_size]


@register_dataset("jsonl", check=_check_jsonl)
def jsonl_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """Rows of the JSON-lines file ``llm.data_path``; evaluation rows from ``llm.eval_data`` (a second file) or
    the held-out ``llm.eval_fraction``."""
    lc = cfg.llm
    rows = to_rows(read_jsonl(lc.data_path), lc, lc.data_path)
    if lc.eval_data is not None:
        train, ev = rows, to_rows(read_jsonl(lc.eval_data, "llm.eval_data"), lc, lc.eval_data)
    else:
        train, ev = _split(rows, lc, lc.data_path)
    return _limit(train, ev, lc, lc.data_path)


_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _hf_records(path: str, split: str, options: dict, key: str) -> list[dict]:
    """The records of split ``split`` of a HF dataset: a ``save_to_disk`` folder, a local data file, or a hub id /
    dataset folder through ``datasets.load_dataset`` (offline: from the cache)."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"no split {split!r}; splits: {list(ds)}")
                ds = ds[split]
        elif p.is_file():
            if p.suffix not in _FILE_BUILDERS:
                raise ValueError(f"a data file must end with one of {sorted(_FILE_BUILDERS)}")
            ds = datasets.load_dataset(_FILE_BUILDERS[p.suffix], data_files={split: str(p)}, split=split, **options)
        else:
            ds = datasets.load_dataset(path, split=split, **options)
    except Exception as e:
        raise ValueError(f"{key}={path!r} (split {split!r}): datasets could not load it: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''}. Offline, give a local path (a "
                         "save_to_disk folder or a .jsonl/.parquet file) or a dataset already in the cache") from None
    return [dict(r) for r in ds]


@register_dataset("hf", check=_check_hf)
def hf_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """Split ``llm.data_split`` of the HF dataset ``llm.data_path``; evaluation rows from the split (or local
    file) ``llm.eval_data``, or the held-out ``llm.eval_fraction``."""
    lc = cfg.llm
    opts = dict(lc.data_options)
    rows = to_rows(_hf_records(lc.data_path, lc.data_split, opts, "llm.data_path"), lc, lc.data_path)
    if lc.eval_data is None:
        train, ev = _split(rows, lc, lc.data_path)
    elif Path(lc.eval_data).expanduser().exists():
        train, ev = rows, to_rows(_hf_records(lc.eval_data, lc.data_split, opts, "llm.eval_data"), lc, lc.eval_data)
    else:
        train, ev = rows, to_rows(_hf_records(lc.data_path, lc.eval_data, opts, "llm.eval_data"), lc, lc.eval_data)
    return _limit(train, ev, lc, lc.data_path)
