"""What a person looks at during and after a run: labelled grids of readable size, the same grids and an LLM
completions table in the trackers (TensorBoard event files read back; a fake accelerate tracker), animated video
samples, a warning for a requested tracker that is not installed, tracker names in the config, progress bars."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.config import load
from flowrl.train import visuals
from flowrl.train.config import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _dark(a: np.ndarray) -> int:
    return int((a.max(axis=-1) < 100).sum())


# --------------------------------------------------------------------------------------------- grids
def test_labelled_grid_upscales_each_sample_to_64px_and_labels_it():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(4, 1, 8, 8, generator=g) * 0.5 + 0.5  # bright, so dark pixels can only be text
    grid = visuals.labelled_grid(imgs, prompts=["a handwritten digit 3", "a handwritten digit 7"],
                                 captions=["r=0.91", "r=0.12", "r=0.50", "r=n/a"], per_row=2)
    a = np.asarray(grid)
    k = visuals.upscale_factor(8, 8)
    assert k == 8
    # sample 0 sits inside a 1-px grey border that starts under the prompt header of row 0
    border = int(np.argmax((a[:, 0] == 128).all(axis=-1)))
    assert border > 5 and (a[border, :66] == 128).all() and (a[border + 65, :66] == 128).all()
    assert a.shape[1] == 2 * (64 + 2)
    tile = a[border + 1:border + 65, 1:65, 0]
    expect = (imgs[0, 0].numpy() * 255 + 0.5).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    np.testing.assert_array_equal(tile, expect)  # nearest upscaling: 8 x 8 blocks, each one source pixel
    # label pixels: the prompt header over row 0 and the caption under sample 0 hold text
    assert _dark(a[:border, :]) > 20
    caption = a[border + 66:border + 66 + border, :64]
    assert _dark(caption) > 10
    blank = visuals.labelled_grid(imgs, prompts=["", ""], captions=[""] * 4, per_row=2)
    assert _dark(np.asarray(blank)) == 0  # so the dark pixels above are the labels


def test_grid_checks_its_inputs():
    with pytest.raises(ValueError, match="captions"):
        visuals.labelled_grid(torch.rand(4, 3, 8, 8), prompts=["a"], captions=["x"] * 4, per_row=2)
    assert visuals.upscale_factor(512, 768) == 1 and visuals.upscale_factor(30, 40) == 3


def test_animation_is_a_gif_with_every_frame(tmp_path):
    from PIL import Image

    vids = torch.rand(2, 5, 3, 8, 12)
    p = visuals.save_animation(vids, tmp_path / "v.gif", prompts=["a cat"], captions=["r=0.1", "r=0.2"], per_row=2)
    with Image.open(p) as im:
        assert im.format == "GIF" and im.n_frames == 5 and min(im.size) >= 64


# --------------------------------------------------------------------------------------------- trackers
class _FakeTracker:
    """Only the surface accelerate's trackers share (``name``, ``log_images``, ``log_table``)."""

    name = "fake"

    def __init__(self):
        self.images, self.tables = [], []

    def log_images(self, values, step=None):
        self.images.append((values, step))

    def log_table(self, name, columns=None, data=None, step=None):
        self.tables.append((name, columns, data, step))


class _Acc:
    is_main_process = True

    def __init__(self, trackers):
        self.trackers = trackers


def test_a_tracker_without_a_writer_gets_images_and_tables_through_accelerates_api():
    from PIL import Image

    fake = _FakeTracker()
    img = Image.new("RGB", (70, 90))
    assert visuals.log_image(_Acc([fake]), "eval/samples", img, 3) == 1
    assert visuals.log_table(_Acc([fake]), "eval/completions", ["prompt", "completion", "reward"], [["1+1=", "2", 1.0]], 3) == 1
    (values, step), = fake.images
    assert step == 3 and values["eval/samples"][0].shape == (90, 70, 3)
    assert fake.tables == [("eval/completions", ["prompt", "completion", "reward"], [["1+1=", "2", 1.0]], 3)]
    off = _Acc([fake])
    off.is_main_process = False  # trackers live on the main process
    assert visuals.log_image(off, "x", img, 1) == 0


def _event_data(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run_dir}"
    found = {"images": {}, "text": {}}
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"images": 0, "tensors": 0})
        ea.Reload()
        for tag in ea.Tags()["images"]:
            found["images"][tag] = ea.Images(tag)
        for tag in ea.Tags()["tensors"]:
            found["text"][tag] = ea.Tensors(tag)
    return found


def _one_iteration(tmp_path, config: str, *sets: str):
    """One small iteration of a shipped config with TensorBoard on, evaluated before and after: the run dir."""
    from flowrl.train.loop import train

    cfg = load(TrainConfig, ROOT / "configs" / config,
               ["iterations=1", "prompts_per_iter=2", "group_size=2", "eval.every=1", "progress=false",
                "trackers=[tensorboard]", "save_every=100", *sets])
    out = tmp_path / "run"
    train(cfg, out)
    return out


def test_digits_run_sends_labelled_grids_to_tensorboard_and_plots_diversity(tmp_path):
    from PIL import Image

    from flowrl.train.metrics_log import curve_panels

    out = _one_iteration(tmp_path, "digits/flow_grpo.yaml", "eval.num_per_prompt=2", "eval.grid_per_prompt=2",
                         "run_name=look-test")
    with Image.open(out / "samples" / "step_00001.png") as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[1] == 2 * (64 + 2) and a.shape[0] >= 10 * 64  # ten digits, two samples each, 64 px each
    assert _dark(a[:, :]) > 0
    ev = _event_data(out)
    imgs = ev["images"]["eval/samples"]
    assert [e.step for e in imgs] == [0, 1] and (imgs[-1].width, imgs[-1].height) == (a.shape[1], a.shape[0])
    assert {"diversity", "realism", "accuracy"} <= set(curve_panels(out / "curves.png"))
    report = (out / "report.md").read_text()
    assert "independent judge" in report and "realism" in report and "miracle" not in report


def test_llm_run_sends_a_completions_table_and_keeps_it(tmp_path):
    import json

    out = _one_iteration(tmp_path, "arith/grpo.yaml", "llm.eval_size=6", "llm.dataset_size=16", "eval.table_rows=4")
    rows = [json.loads(x) for x in (out / "samples" / "step_00001.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "completion", "reward", "correct"}
    text = _event_data(out)["text"]["eval/completions/text_summary"]
    assert [e.step for e in text] == [0, 1]
    table = text[-1].tensor_proto.string_val[0].decode()
    assert table.count("\n") == 4 + 1 and rows[0]["prompt"].replace("\n", "\\n") in table  # header, rule, 4 rows
    report = (out / "report.md").read_text()
    assert "judge" not in report.lower() and "realism" not in report.lower()
    assert "miracle" in report and "every step" in report and "## Completions after training" in report


def test_video_grid_is_saved_as_an_animation(tmp_path):
    from PIL import Image

    from flowrl.pipelines.tiny import build_tiny_wan
    from flowrl.train.loop import train

    d = build_tiny_wan(tmp_path / "wan")
    cfg = load(TrainConfig, None, ["flow.model=wan", f"flow.model_path={d}",
                                   "flow.model_kwargs={height: 16, width: 16, num_frames: 5}", "flow.prompts=[a cat]",
                                   "flow.rewards={video_frames: {weight: 1.0, image: jpeg_compressibility}}",
                                   "iterations=1", "prompts_per_iter=1", "group_size=2", "flow.num_steps=2",
                                   "eval.every=100", "eval.num_per_prompt=1", "eval.grid_per_prompt=2",
                                   "progress=false", "trackers=[]"])
    train(cfg, tmp_path / "run")
    with Image.open(tmp_path / "run" / "samples" / "step_00001.gif") as gif, \
            Image.open(tmp_path / "run" / "samples" / "step_00001.png") as png:
        assert gif.n_frames >= 2 and gif.size == png.size


# --------------------------------------------------------------------------------------------- tracker config
def test_a_missing_tracker_warns_and_is_skipped(monkeypatch):
    import accelerate.tracking

    from flowrl.train.loop import available_trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.warns(RuntimeWarning, match="'wandb' was requested but its package is not installed"):
        assert available_trackers(["tensorboard", "wandb"]) == ["tensorboard"]


def test_tracker_project_run_name_and_init_arguments_in_the_config(tmp_path):
    from flowrl.train.loop import tracker_init_kwargs

    cfg = load(TrainConfig, None, ["trackers=[tensorboard, wandb]", "tracker_project=digits-rl",
                                   "tracker_init={wandb: {entity: me, tags: [a]}}"])
    assert cfg.tracker_project == "digits-rl"
    kw = tracker_init_kwargs(cfg, ["tensorboard", "wandb"], tmp_path / "my-run")
    assert kw == {"wandb": {"entity": "me", "tags": ["a"], "name": "my-run"}}
    named = load(TrainConfig, None, ["trackers=[wandb]", "run_name=first try"])
    assert tracker_init_kwargs(named, ["wandb"], tmp_path / "x") == {"wandb": {"name": "first try"}}
    for bad, msg in ((["trackers=[tensorbord]"], "'tensorbord' is not a tracker accelerate knows; valid: .*tensorboard"),
                     (["trackers=[]", "tracker_init={wandb: {entity: me}}"], "tracker_init.wandb: 'wandb' is not in trackers"),
                     (["tracker_project= "], "tracker_project"), (["run_name="], "run_name")):
        with pytest.raises(Exception, match=msg):
            load(TrainConfig, None, bad)


# --------------------------------------------------------------------------------------------- progress
def test_progress_bars_follow_the_context_and_stay_off_by_default(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from flow_testing import GaussianPipeline

    from flowrl.flow.sampler import progress_bars, sample

    pipe = GaussianPipeline(torch.zeros(2), 0.5)
    sample(pipe, ["a"], num_steps=3, seed=0)
    assert "sampling" not in capsys.readouterr().err
    with progress_bars(True):
        sample(pipe, ["a"], num_steps=3, seed=0)
        sample(pipe, ["a"], num_steps=3, seed=0, progress=False)  # an explicit False still wins
    err = capsys.readouterr().err
    assert err.count("sampling:") == 1  # one bar: the call that left progress unset
    sample(pipe, ["a"], num_steps=3, seed=0)
    assert "sampling" not in capsys.readouterr().err  # the context restored the default
