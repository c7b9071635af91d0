"""What a person looks at during and after a run: labelled sample grids, animated video samples, completions
tables, and sending them to the run's trackers (TensorBoard, W&B).

- :func:`labelled_grid`: images float [N, C, H, W] in [0, 1], one row per prompt, upscaled by an integer factor
  (nearest neighbour, so pixels stay pixels) until each sample is at least ``min_px`` on its shorter side; a
  caption strip under every sample (its reward) and a header over every row (its prompt). Text is drawn with
  PIL's built-in font (``ImageFont.load_default``), which needs no font file on the system.
- :func:`save_animation`: video samples float [N, F, C, H, W] as one animated GIF of the labelled grid (PIL only).
- :func:`log_image` / :func:`log_table`: to every tracker of an ``accelerate.Accelerator`` that can take one
  (a writer per tracker name below; a tracker with neither a writer nor accelerate's ``log_images`` /
  ``log_table`` is skipped). Trackers live on the main process only, so these are no-ops elsewhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

MIN_PX = 64
CAPTION_PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
SEPARATOR = (128, 128, 128)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


def _to_uint8(images: Tensor) -> np.ndarray:
    """float [N, C, H, W] in [0, 1] (C = 1 or 3) -> uint8 [N, H, W, 3]."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must be float [N, C, H, W] with C in (1, 3, 4); got {tuple(x.shape)}")
    x = x[:, :3] if x.shape[1] >= 3 else x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def upscale_factor(height: int, width: int, min_px: int = MIN_PX) -> int:
    """The smallest integer k with min(height, width) * k >= min_px (1 when already large enough)."""
    return max(1, math.ceil(min_px / max(1, min(height, width))))


def labelled_grid(images: Tensor, *, prompts: Sequence[str], captions: Sequence[str], per_row: int,
                  min_px: int = MIN_PX):
    """A PIL RGB image: ``images`` float [N, C, H, W] in [0, 1] in rows of ``per_row`` (row r: prompt
    ``prompts[r]``, written over the row), each sample upscaled (nearest, integer factor) to at least ``min_px``
    pixels on its shorter side, with ``captions[i]`` written under sample i. N = len(prompts) * per_row =
    len(captions)."""
    from PIL import Image, ImageDraw

    n = images.shape[0]
    if len(captions) != n or len(prompts) * per_row != n:
        raise ValueError(f"labelled_grid: {n} images need {n} captions and {n}/{per_row} prompts; got "
                         f"{len(captions)} captions and {len(prompts)} prompts")
    pix = _to_uint8(images)
    h, w = pix.shape[1:3]
    k = upscale_factor(h, w, min_px)
    ch, cw = h * k, w * k
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag0", font)[1] + 2 * CAPTION_PAD + 2
    cell_w, cell_h = cw + 2, ch + line_h  # 1 px border each side; caption strip under the sample
    rows = len(prompts)
    canvas = Image.new("RGB", (per_row * cell_w, rows * (line_h + cell_h)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, prompt in enumerate(prompts):
        top = r * (line_h + cell_h)
        draw.text((CAPTION_PAD, top + CAPTION_PAD), _fit(draw, prompt, font, canvas.width - 2 * CAPTION_PAD),
                  fill=TEXT, font=font)
        for j in range(per_row):
            i = r * per_row + j
            x0, y0 = j * cell_w, top + line_h
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + ch + 1], fill=SEPARATOR)
            tile = Image.fromarray(pix[i]).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (x0 + 1, y0 + 1))
            draw.text((x0 + CAPTION_PAD, y0 + ch + 2 + CAPTION_PAD), _fit(draw, captions[i], font, cw),
                      fill=TEXT, font=font)
    return canvas


def save_animation(videos: Tensor, path: Path, *, prompts: Sequence[str], captions: Sequence[str], per_row: int,
                   fps: float = 8.0, min_px: int = MIN_PX) -> Path:
    """Video samples float [N, F, C, H, W] in [0, 1] as one animated GIF: frame f is the labelled grid of every
    sample's frame f (loops forever)."""
    if videos.dim() != 5:
        raise ValueError(f"save_animation: videos must be [N, F, C, H, W]; got {tuple(videos.shape)}")
    frames = [labelled_grid(videos[:, f], prompts=prompts, captions=captions, per_row=per_row, min_px=min_px)
              for f in range(videos.shape[1])]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """``rows`` as JSON lines of {column: value} (the run directory's copy of a tracker table)."""
    path = Path(path)
    path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
    return path


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells have ``|`` escaped and newlines shown as ``\\n``."""
    def cell(v: Any) -> str:
        s = f"{v:.4f}" if isinstance(v, float) else str(v)
        return s.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- trackers
def _tb_image(tracker, tag: str, image, step: int) -> None:
    tracker.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
    tracker.writer.flush()


def _tb_table(tracker, tag: str, columns, rows, step: int) -> None:
    tracker.writer.add_text(tag, markdown_table(columns, rows), global_step=step)
    tracker.writer.flush()


def _wandb_image(tracker, tag: str, image, step: int) -> None:
    import wandb

    tracker.run.log({tag: wandb.Image(image)}, step=step)


def _wandb_table(tracker, tag: str, columns, rows, step: int) -> None:
    tracker.log_table(tag, columns=list(columns), data=[list(r) for r in rows], step=step)


# tracker name -> (image writer, table writer); accelerate's own log_images / log_table serve the others
WRITERS: dict[str, tuple[Callable, Callable]] = {
    "tensorboard": (_tb_image, _tb_table),
    "wandb": (_wandb_image, _wandb_table),
}


def _trackers(accelerator) -> list:
    if accelerator is None or not accelerator.is_main_process:
        return []
    return list(getattr(accelerator, "trackers", []) or [])


def log_image(accelerator, tag: str, image, step: int) -> int:
    """Send a PIL image to every tracker of ``accelerator`` that takes images; returns how many took it."""
    sent = 0
    for t in _trackers(accelerator):
        writer = WRITERS.get(t.name, (None, None))[0]
        if writer is not None:
            writer(t, tag, image, step)
        elif hasattr(t, "log_images"):
            t.log_images({tag: [np.asarray(image)]}, step=step)
        else:
            continue
        sent += 1
    return sent


def log_table(accelerator, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> int:
    """Send a table to every tracker of ``accelerator`` that takes tables (TensorBoard: as markdown text);
    returns how many took it."""
    sent = 0
    for t in _trackers(accelerator):
        writer = WRITERS.get(t.name, (None, None))[1]
        if writer is not None:
            writer(t, tag, columns, rows, step)
        elif hasattr(t, "log_table"):
            t.log_table(tag, columns=list(columns), data=[list(r) for r in rows], step=step)
        else:
            continue
        sent += 1
    return sent


def reward_captions(rewards: Optional[Tensor], n: int) -> list[str]:
    """``r=0.93`` per sample (``r=n/a`` where a reward is missing or not finite)."""
    if rewards is None:
        return ["r=n/a"] * n
    vals = rewards.detach().float().cpu().tolist()
    return [f"r={v:.2f}" if math.isfinite(v) else "r=n/a" for v in vals]
