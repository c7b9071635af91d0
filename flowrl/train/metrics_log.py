"""The one logging path of a run: ``metrics.jsonl`` plus accelerate's trackers, and the reward-curve plot.

Every line of ``metrics.jsonl`` is one JSON object with ``step`` and ``split`` ("train" or "eval")
and plain numbers. On resume, lines after the resumed step are dropped first, so a resumed run's
file reads exactly like an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
    if hasattr(v, "detach"):  # a tensor: one host sync, here at the logging boundary
        v = v.detach().float().cpu()
        return v.tolist() if v.numel() != 1 else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(out_dir: str | Path, split: Optional[str] = None) -> list[dict]:
    """All lines of ``<out_dir>/metrics.jsonl`` (optionally only one split)."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` (main process only) and forward them to ``accelerator.log``."""

    def __init__(self, out_dir: str | Path, *, accelerator=None, resume_step: Optional[int] = None,
                 is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.accelerator = accelerator
        self.is_main = is_main
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._truncate_after(resume_step)
            elif self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh file

    def _truncate_after(self, step: int) -> None:
        keep = [r for r in read_metrics(self.out_dir) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any], *, step: int, split: str = "train") -> dict:
        """Write one line; returns the plain dict written."""
        row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            scalars = {f"{split}/{k}": v for k, v in row.items()
                       if k not in ("step", "split") and isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=int(step))
        return row


PANELS_KEY = "flowrl:panels"  # PNG text chunk of curves.png: the plotted keys, comma-separated


def plot_curves(out_dir: str | Path, keys: Iterable[str] = ("reward", "accuracy"), path: Optional[str | Path] = None,
                per_row: int = 3) -> Path:
    """PNG of train and eval curves of ``keys`` against step, one panel per key (``per_row`` panels a row). The
    plotted keys are kept in the PNG's text chunk ``flowrl:panels`` (read back with ``curve_panels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = list(keys)
    rows = read_metrics(out_dir)
    ncol = min(per_row, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), squeeze=False)
    flat = list(axes.flat)
    for ax, key in zip(flat, keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, ms=3)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in flat[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path) if path else Path(out_dir) / "curves.png"
    fig.savefig(out, dpi=110, metadata={PANELS_KEY: ",".join(keys)})
    plt.close(fig)
    return out


def curve_panels(path: str | Path) -> list[str]:
    """The keys a ``curves.png`` written by :func:`plot_curves` plots, in panel order."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(PANELS_KEY, "")
    return [k for k in text.split(",") if k]
