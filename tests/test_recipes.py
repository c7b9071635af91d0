"""docs/recipes.md against the shipped configs, and a registered loss's own defaults in the config layer.

Every table of docs/recipes.md has the columns parameter | reference default | reference file | config | key |
flowrl value | note. For each row that names a config, the config is loaded with flowrl's own loader (defaults
filled in, no model, no training) and the value at the dotted key must equal the row's `flowrl value` (YAML). Under
``advantage.params`` / ``loss.params`` a key the YAML leaves out is the registered function's own default, the
value the run uses.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

from flowrl.config import load, yaml_load
from flowrl.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"
COLUMNS = ["parameter", "reference default", "reference file", "config", "key", "flowrl value", "note"]
NONE = "-"


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row; ``\\|`` is a pipe inside a cell."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    if cells and not cells[0].strip():
        cells = cells[1:]
    if cells and not cells[-1].strip():
        cells = cells[:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def parse_tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """[(heading, rows)] for every table of ``text``; each row a dict over COLUMNS. A table with other columns,
    or a row with another number of cells, is an error (the page's format is what the test relies on)."""
    out: list[tuple[str, list[dict[str, str]]]] = []
    heading, rows, in_table = "", None, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = split_row(line)
        if not in_table:
            assert cells == COLUMNS, f"recipes.md line {n}: a table's header must be {COLUMNS}; got {cells}"
            rows, in_table = [], True
            out.append((heading, rows))
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the |---| separator
        assert len(cells) == len(COLUMNS), f"recipes.md line {n}: {len(cells)} cells, expected {len(COLUMNS)}"
        rows.append(dict(zip(COLUMNS, cells), line=str(n)))
    return out


TABLES = parse_tables(DOC.read_text())
CHECKED = [(h, r) for h, rows in TABLES for r in rows if r["config"] != NONE]


@lru_cache(maxsize=None)
def config(path: str) -> TrainConfig:
    return load(TrainConfig, ROOT / path)


def function_default(fn, name: str, where: str):
    p = inspect.signature(fn).parameters.get(name)
    if p is None or p.default is p.empty:
        raise KeyError(f"{where}: {name!r} is neither in the config nor a keyword parameter with a default")
    return p.default


def value_at(cfg: TrainConfig, key: str):
    """The value a run of ``cfg`` uses for the dotted ``key``."""
    from flowrl.core import ADVANTAGES, LOSSES

    registered = {"advantage.params": lambda: ADVANTAGES[cfg.advantage.estimator],
                  "loss.params": lambda: LOSSES[cfg.loss.name]}
    parts, node = key.split("."), cfg
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if dataclasses.is_dataclass(node):
            if part not in {f.name for f in dataclasses.fields(node)}:
                raise KeyError(f"{key}: {here or 'the config'} has no key {part!r}")
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif here in registered and i == len(parts) - 1:
            node = function_default(registered[here](), part, key)
        else:
            raise KeyError(f"{key}: {here} has no key {part!r}")
    return node


def same(got, want) -> bool:
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)
    return got == want


def test_the_page_has_the_llm_anchors_and_every_row_is_complete():
    headings = [h for h, _ in TABLES]
    for anchor in ("PRIME", "GSPO", "DAPO", "Dr. GRPO"):
        assert any(h.startswith(anchor) for h in headings), f"no table under a heading starting with {anchor!r}"
    for heading, rows in TABLES:
        assert rows, f"the table under {heading!r} has no rows"
        for r in rows:
            where = f"recipes.md line {r['line']} ({heading}: {r['parameter']})"
            assert r["parameter"] and r["reference default"] and r["reference file"], where
            cols = (r["config"], r["key"], r["flowrl value"])
            assert all(c == NONE for c in cols) or NONE not in cols, f"{where}: config, key and value go together"
            if r["config"] != NONE:
                assert (ROOT / r["config"]).is_file(), f"{where}: no file {r['config']}"
                assert r["flowrl value"].startswith("`") and r["flowrl value"].endswith("`"), where
            if r["config"] == NONE:
                assert r["note"], f"{where}: a setting flowrl does not have needs a note saying so"


@pytest.mark.parametrize("path", sorted({r["config"] for _, r in CHECKED}))
def test_each_flowrl_value_is_the_configs(path):
    cfg, wrong = config(path), []
    for heading, r in CHECKED:
        if r["config"] != path:
            continue
        want = yaml_load(r["flowrl value"].strip("`"))
        got = value_at(cfg, r["key"])
        if not same(got, want):
            wrong.append(f"line {r['line']} ({heading}) {r['key']}: table {want!r}, config {got!r}")
    assert not wrong, f"docs/recipes.md and {path} disagree:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------- a loss's own defaults
def loss_cfg(tmp_path, loss: str, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(f"algorithm: llm_grpo\nloss: {loss}\nllm: {{model: arithmetic}}\n")
    return load(TrainConfig, p, overrides)


def test_gspo_takes_its_own_defaults_when_unset_and_an_explicit_value_wins(tmp_path):
    """The training config's defaults used to be ppo_clip's (token_mean, eps_low 1e-4, adv_clip 5) for every loss."""
    cfg = loss_cfg(tmp_path, "{name: gspo}")
    assert cfg.loss.agg == "seq_mean_token_mean"
    assert cfg.loss.params == {"eps_low": 3e-4, "eps_high": 4e-4}
    cfg = loss_cfg(tmp_path, "{name: gspo, agg: token_mean, params: {eps_low: 1.0e-3}}")
    assert cfg.loss.agg == "token_mean" and cfg.loss.params == {"eps_low": 1e-3}
    assert value_at(cfg, "loss.params.eps_high") == 4e-4  # left out of the mapping: the loss's own
    cfg = loss_cfg(tmp_path, "{name: gspo}", ["loss.params.eps_high=5.0e-4"])
    assert cfg.loss.agg == "seq_mean_token_mean" and cfg.loss.params == {"eps_high": 5e-4}
    assert value_at(cfg, "loss.params.eps_low") == 3e-4
    cfg = loss_cfg(tmp_path, "{name: ppo_clip}")  # unchanged: Flow-GRPO's clip and advantage clip
    assert cfg.loss.agg == "token_mean" and cfg.loss.params == {"eps_low": 1e-4, "adv_clip": 5.0}


def test_a_plugin_loss_brings_its_own_defaults(tmp_path):
    """The defaults come from the registration, whatever the loss's name; without any, the function's own agg."""
    from flowrl.core import LOSSES
    from flowrl.core.losses import register_loss

    def seq_loss(logp, old_logp, adv, mask, *, agg="seq_mean_token_sum", scale=1.0):
        raise AssertionError("not called")

    def bare_loss(logp, old_logp, adv, mask, *, agg="seq_mean_token_sum_norm", scale=1.0):
        raise AssertionError("not called")

    register_loss("test_recipes_seq", agg="seq_mean_token_mean", params={"scale": 2.0})(seq_loss)
    register_loss("test_recipes_bare")(bare_loss)
    try:
        cfg = loss_cfg(tmp_path, "{name: test_recipes_seq}")
        assert cfg.loss.agg == "seq_mean_token_mean" and cfg.loss.params == {"scale": 2.0}
        cfg = loss_cfg(tmp_path, "{name: test_recipes_bare}")
        assert cfg.loss.agg == "seq_mean_token_sum_norm" and cfg.loss.params == {}
        with pytest.raises(ValueError, match="agg='nope'"):
            register_loss("test_recipes_bad", agg="nope")
    finally:
        LOSSES.unregister("test_recipes_seq")
        LOSSES.unregister("test_recipes_bare")
