"""docs/methods.md must list every paper of docs/papers.txt once and name only primitives that exist.

The paper list (docs/papers.txt, shipped in the repository so a clone tests with nothing beside it) is a text
dump of a paper-listing web page.
A paper there is an abstract (one long line) preceded by its title (the previous non-empty line); everything
else (author counts, dates, page furniture) is short. The catalogue is a set of Markdown tables whose rows start
with a running number; the Status cell starts with **implemented**, **recipe** or **out of scope**.
"""
from __future__ import annotations

import collections
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAPERS = REPO / "docs/papers.txt"
CATALOGUE = REPO / "docs/methods.md"
STATUSES = ("implemented", "recipe", "out of scope")
ABSTRACT_MIN_CHARS = 500  # the shortest abstract in the dump has ~1,370 characters; titles stay under ~130
TITLE_MAX_CHARS = 300
COLUMNS = ("#", "Paper", "Contribution", "flowrl primitives", "Config", "Status")


def norm(text: str) -> str:
    """Drop Markdown backslash escapes and collapse whitespace, so titles compare as plain text."""
    return " ".join(re.sub(r"\\(.)", r"\1", text).split())


def paper_titles() -> list[str]:
    if not PAPERS.is_file():
        pytest.fail(f"paper list not found at {PAPERS}: the catalogue test reads docs/papers.txt")
    lines = [l.strip() for l in PAPERS.read_text(encoding="utf-8").splitlines() if l.strip()]
    titles = []
    for prev, line in zip(lines, lines[1:]):
        if len(line) >= ABSTRACT_MIN_CHARS:
            assert len(prev) <= TITLE_MAX_CHARS, f"abstract not preceded by a title line: {line[:80]!r}"
            titles.append(norm(prev))
    return titles


def catalogue_rows() -> list[dict[str, str]]:
    assert CATALOGUE.is_file(), f"{CATALOGUE} is missing"
    rows = []
    for n, line in enumerate(CATALOGUE.read_text(encoding="utf-8").splitlines(), 1):
        if not re.match(r"^\|\s*\d+\s*\|", line):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == len(COLUMNS), f"docs/methods.md line {n}: {len(cells)} cells, expected {COLUMNS}"
        row = dict(zip(COLUMNS, cells))
        title = re.search(r"\*\*(.+?)\*\*", row["Paper"])
        assert title, f"docs/methods.md line {n}: the Paper cell has no **bold title**"
        status = re.match(r"\*\*(implemented|recipe|out of scope)\*\*", row["Status"])
        assert status, f"docs/methods.md line {n}: Status must start with one of {STATUSES} in bold"
        row.update(line=str(n), title=norm(title.group(1)), status=status.group(1))
        rows.append(row)
    return rows


def implemented_names(row: dict[str, str]) -> list[str]:
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row["Status"])


def core_namespace() -> tuple[set[str], list[str]]:
    """Every public name of flowrl.core and its submodules, plus every key of a registry (an upper-case dict,
    e.g. ADVANTAGES, LOSSES) and every entry of an upper-case tuple of names (e.g. AGG_MODES)."""
    import flowrl.core as core

    modules, errors = [core], []
    for info in pkgutil.iter_modules(core.__path__):
        try:
            modules.append(importlib.import_module(f"flowrl.core.{info.name}"))
        except Exception as e:  # reported in the failure message, not hidden
            errors.append(f"flowrl.core.{info.name}: {type(e).__name__}: {e}")
    names: set[str] = set()
    for mod in modules:
        for attr, value in vars(mod).items():
            if attr.startswith("_"):
                continue
            names.add(attr)
            if attr.isupper() and isinstance(value, dict):
                names.update(k for k in value if isinstance(k, str))
            if attr.isupper() and isinstance(value, (tuple, frozenset, set)):
                names.update(k for k in value if isinstance(k, str))
    return names, errors


def test_paper_list_parses_into_unique_titles():
    titles = paper_titles()
    assert len(titles) > 0, f"no paper found in {PAPERS}"
    dup = [t for t, c in collections.Counter(titles).items() if c > 1]
    assert not dup, f"titles appear twice in the paper list: {dup}"


def test_one_row_per_paper():
    titles, rows = paper_titles(), catalogue_rows()
    assert len(rows) == len(titles), f"{len(rows)} catalogue rows for {len(titles)} papers in {PAPERS}"
    assert [int(r["#"]) for r in rows] == list(range(1, len(rows) + 1)), "rows must be numbered 1..N in order"
    have = collections.Counter(r["title"] for r in rows)
    missing = sorted(set(titles) - set(have))
    extra = sorted(set(have) - set(titles))
    twice = sorted(t for t, c in have.items() if c > 1)
    assert not (missing or extra or twice), f"missing: {missing}\nnot in the paper list: {extra}\ntwice: {twice}"


def test_summary_counts_match_rows():
    text = CATALOGUE.read_text(encoding="utf-8")
    m = re.search(r"(\d+) papers: (\d+) implemented, (\d+) recipes, (\d+) out of scope", text)
    assert m, "the intro must state 'N papers: a implemented, b recipes, c out of scope'"
    rows = catalogue_rows()
    counts = collections.Counter(r["status"] for r in rows)
    stated = tuple(int(g) for g in m.groups())
    actual = (len(rows), counts["implemented"], counts["recipe"], counts["out of scope"])
    assert stated == actual, f"intro says {stated} (papers, implemented, recipes, out of scope); rows give {actual}"


def test_every_status_is_explained():
    for r in catalogue_rows():
        why = r["Status"].split("**", 2)[2].lstrip(":").strip()
        assert len(why) >= 20, f"row {r['#']} ({r['title']}): the status needs its reason, primitives or recipe"
        assert len(r["Contribution"]) >= 40, f"row {r['#']} ({r['title']}): contribution missing"
        if r["status"] == "implemented":
            assert implemented_names(r), f"row {r['#']}: an implemented row must name its primitive in `backticks`"
            assert re.search(r"tests/test_\w+\.py", r["Status"]), f"row {r['#']}: name the test file"


def test_implemented_primitives_exist_in_core():
    names, errors = core_namespace()
    missing = collections.defaultdict(list)
    for r in catalogue_rows():
        if r["status"] == "implemented":
            for name in implemented_names(r):
                if name not in names:
                    missing[name].append(int(r["#"]))
    assert not missing, (
        "primitives the catalogue calls implemented are neither registered in flowrl.core's registries nor "
        f"importable from flowrl.core or its submodules: {dict(missing)} (name: catalogue rows)"
        + (f"\nflowrl.core submodules that failed to import: {errors}" if errors else "")
    )


def test_named_test_files_exist():
    missing = collections.defaultdict(list)
    for r in catalogue_rows():
        if r["status"] == "implemented":
            for path in re.findall(r"tests/test_\w+\.py", r["Status"]):
                if not (REPO / path).is_file():
                    missing[path].append(int(r["#"]))
    assert not missing, f"test files named by implemented rows do not exist: {dict(missing)} (file: rows)"


def test_listed_configs_exist_unless_planned():
    for r in catalogue_rows():
        for path in re.findall(r"configs/[\w./-]+\.ya?ml", r["Config"]):
            if "planned" not in r["Config"]:
                assert (REPO / path).is_file(), f"row {r['#']}: {path} is listed as existing but is not there"
