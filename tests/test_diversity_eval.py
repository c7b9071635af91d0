"""Diversity as an evaluation metric: the digits evaluation (pixels, Vendi with a fixed Gaussian kernel, SDE and
ODE), the report's collapse checks on a real digits evaluation, the ``clip`` feature extractor on a tiny random
open_clip model (offline), and the generic flow evaluation on the tiny SD3 (per prompt, mean over prompts, also
when the evaluation is cut into chunks that straddle prompts)."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from accelerate import Accelerator

from flowrl.config import load
from flowrl.pipelines.digits import digits_split, load_digit_classifier, load_digit_judge, score_digits
from flowrl.rewards.features import build_features
from flowrl.train.config import TrainConfig
from flowrl.train.report import DIVERSITY_FLOOR, ReportPlan, run_checks

torch.set_num_threads(1)
COLLAPSE = ("diversity", "vendi", "ode/diversity", "ode/vendi")
TINY = "flowrl-test-diversity-clip"
TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _loop_mean_distance(x: torch.Tensor, group: list[int]) -> float:
    """Mean over groups of the mean distance over a group's ordered pairs (double loop)."""
    per = []
    for g in sorted(set(group)):
        idx = [i for i, h in enumerate(group) if h == g]
        ds = [float((x[i] - x[j]).double().norm()) for i in idx for j in idx if i != j]
        if ds:
            per.append(sum(ds) / len(ds))
    return sum(per) / len(per)


# ---------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def real_digits():
    """12 real digits of each of 0..9 from the judge split, in [0, 1], and the scorers."""
    x, y = digits_split("judge")
    idx = torch.cat([torch.nonzero(y == d)[:12, 0] for d in range(10)])
    return (x[idx] + 1) / 2, y[idx], dict(classifier=load_digit_classifier(), judge=load_digit_judge())


def _pull(images: torch.Tensor, digits: torch.Tensor, a: float) -> torch.Tensor:
    """Each image moved to first + a (x - first), first the digit's first image: every within-digit distance
    scaled by exactly a (a = 0: all samples of a digit identical)."""
    first = images[torch.searchsorted(digits, digits)]  # digits sorted: the first index of each digit
    return first + a * (images - first)


def test_digits_scores_diversity_by_loops_and_vendi_falls_with_a_collapse(real_digits):
    x, y, judges = real_digits
    s = score_digits(x, y, **judges)
    assert s["diversity"] == pytest.approx(_loop_mean_distance(x.flatten(1), y.tolist()), rel=1e-5)
    assert 4.0 < s["vendi"] < 7.0, s  # real digits, 12 of each: about 5 effective samples per digit
    v = [score_digits(_pull(x, y, a), y, **judges)["vendi"] for a in (0.9, 0.6, 0.3, 0.0)]
    assert s["vendi"] > v[0] > v[1] > v[2] > v[3] and v[3] == pytest.approx(1.0, abs=1e-4), (s["vendi"], v)
    assert v[1] < 0.7 * s["vendi"]  # the kernel is fixed (h = 2), so a 0.6x pull shows plainly


def test_collapse_checks_flag_half_the_diversity_and_not_nine_tenths(real_digits):
    x, y, judges = real_digits
    before = score_digits(x, y, **judges)
    plan = ReportPlan(checks=COLLAPSE)
    for a, flagged in ((0.5, set(COLLAPSE)), (0.9, set())):
        after = score_digits(_pull(x, y, a), y, **judges)
        assert after["diversity"] == pytest.approx(a * before["diversity"], rel=1e-5)
        # the same samples stand in for the ODE evaluation
        b = {**before, **{f"ode/{k}": v for k, v in before.items()}}
        f = {**after, **{f"ode/{k}": v for k, v in after.items()}}
        res = dict(run_checks(plan, b, f))
        assert {k for k, r in res.items() if r.status == "flag"} == flagged, (a, res)
    # at the floor itself: 0.69x flagged, 0.71x not
    for r, status in ((DIVERSITY_FLOOR - 0.01, "flag"), (DIVERSITY_FLOOR + 0.01, "ok")):
        (_, got), = run_checks(ReportPlan(checks=("ode/vendi",)), {"ode/vendi": 5.0}, {"ode/vendi": 5.0 * r})
        assert got.status == status and "ode/vendi" in got.text


def test_digits_evaluation_adds_the_ode_twin_and_leaves_the_global_rng_alone(monkeypatch):
    import flowrl.pipelines.digits as digits

    calls = []

    def fake(pipeline, **kw):  # records each sampling of the evaluation (the real one: test_digits.py, demo runs)
        calls.append({k: v for k, v in kw.items() if k not in ("classifier", "judge")})
        return {"accuracy": 0.5 if kw["kind"] == "ode" else 0.7, "diversity": 1.0, "vendi": 3.0, "reward_prob": 0.6}

    monkeypatch.setattr(digits, "evaluate_digits", fake)
    pipe = type("Pipe", (), {"device": torch.device("cpu")})()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    m = digits.DigitsPipeline.evaluate(pipe, num_per_prompt=2, seed=3, num_steps=2, kind="cps", noise_level=0.7,
                                       cfg_scale=None)
    assert torch.equal(torch.get_rng_state(), state)  # building the classifier drew nothing from the run's RNG
    same = dict(num_per_digit=2, seed=3, guidance=None, num_steps=2, noise_level=0.7, cfg_scale=None)
    assert calls == [dict(same, kind="cps"), dict(same, kind="ode")]
    assert m == {"accuracy": 0.7, "diversity": 1.0, "vendi": 3.0, "reward_prob": 0.6, "reward": 0.6,
                 "ode/accuracy": 0.5, "ode/diversity": 1.0, "ode/vendi": 3.0, "ode/reward_prob": 0.6}
    plan = ReportPlan.from_dict(digits.DigitsPipeline.report_plan(pipe))
    assert set(COLLAPSE) <= set(plan.checks) and set(COLLAPSE) <= set(plan.metrics)


# ---------------------------------------------------------------------------------------------- clip features
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip config registered under TINY and its random weights as a local safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    (d / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(d / f"{TINY}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "tiny.safetensors"))
    return {"name": "clip", "model_name": TINY, "pretrained": str(d / "tiny.safetensors"), "device": "cpu"}


def test_clip_features_are_the_clip_rewards_embeddings_and_video_averages_frames(tiny_clip):
    import open_clip

    from flowrl.rewards.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

    spec = dict(tiny_clip)
    feats = build_features(spec.pop("name"), batch_size=2, **spec)  # 5 images in chunks of 2
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 40, 48, generator=g)
    got = feats(x)
    # reference: open_clip's own model and encoder, one image at a time
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=tiny_clip["pretrained"])
    model.eval()
    with torch.no_grad():
        ref = torch.stack([model.encode_image(clip_preprocess(x[i:i + 1], 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))[0]
                           for i in range(5)])
    torch.testing.assert_close(got, ref / ref.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    video = torch.stack([x[:3], x[2:]])  # [2, 3 frames, C, H, W]
    torch.testing.assert_close(feats(video), torch.stack([got[:3].mean(0), got[2:].mean(0)]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"clip features need images float \[B, C, H, W\] or video"):
        feats(x[0])


def test_pixel_features_pool_large_images_to_a_thumbnail():
    x = torch.rand(2, 3, 128, 96)
    f = build_features("pixels", size=64)(x)
    assert f.shape == (2, 3 * 64 * 48)
    assert f[0, 0] == pytest.approx(float(x[0, 0, :2, :2].mean()))  # 2 x 2 blocks averaged
    assert f[1, 48 * 64 + 1] == pytest.approx(float(x[1, 1, :2, 2:4].mean()))
    assert torch.equal(build_features("pixels")(x), x.flatten(1))


def test_digits_classifier_features_are_the_reward_classifiers_penultimate_layer():
    """Against the layer written out from the shipped classifier's weights (convs, pool, fc1, SiLU on [-1, 1]
    inputs); a pairwise bonus built from the config's feature name uses exactly these distances."""
    from torch.nn import functional as F

    from flowrl.core.diversity_bonus import diversity_bonus
    from flowrl.pipelines.digits import load_digit_classifier
    from flowrl.train.flow_diversity import DiversityBonuses

    c = load_digit_classifier()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    h = F.silu(F.conv2d(x * 2 - 1, c.conv1.weight, c.conv1.bias, padding=1))
    h = F.max_pool2d(F.silu(F.conv2d(h, c.conv2.weight, c.conv2.bias, padding=1)), 2)
    h = F.silu(F.conv2d(h, c.conv3.weight, c.conv3.bias, padding=1))
    ref = F.silu(h.flatten(1) @ c.fc1.weight.T + c.fc1.bias)  # [6, D]
    got = build_features("digits_classifier")(x)
    assert got.shape == (6, c.fc1.out_features) and not got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the classifier's logits are read from this layer: fc2 of it is the classifier's output
    torch.testing.assert_close(got @ c.fc2.weight.T + c.fc2.bias, c(x), atol=1e-5, rtol=1e-5)
    group, reward = torch.tensor([0, 0, 0, 1, 1, 1]), torch.zeros(6)
    bonus, parts = DiversityBonuses([{"name": "pairwise", "weight": 0.5, "features": "digits_classifier"}])(x, group, reward)
    want = diversity_bonus("pairwise", ref.double(), group, reward.double()).float()
    torch.testing.assert_close(parts["diversity/pairwise"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bonus, 0.5 * want)
    assert not torch.allclose(want, diversity_bonus("pairwise", x.flatten(1).double(), group, reward.double()).float())
    with pytest.raises(ValueError, match=r"digits_classifier features need digits images float \[B, 1, 8, 8\]"):
        build_features("digits_classifier")(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- generic flow eval
def _task(sd3_dir, *overrides):
    from flowrl.train.flow_task import FlowTask

    cfg = load(TrainConfig, None, ["flow.model=sd3", f"flow.model_path={sd3_dir}", "flow.prompts=[a red cube, a blue ball]",
                                   "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "flow.num_steps=2",
                                   "eval.num_per_prompt=3", "progress=false", "trackers=[]", *overrides])
    return FlowTask(cfg, Accelerator(cpu=True))


@pytest.fixture(scope="module")
def task(sd3_dir):
    """The tiny SD3 with two evaluation prompts, 3 samples each, the default pixel features (one per module: the
    tests below change its eval settings with monkeypatch)."""
    return _task(sd3_dir)


@pytest.mark.parametrize("batch_size", [0, 2])
def test_generic_flow_eval_logs_diversity_per_prompt(task, batch_size, monkeypatch):
    from flowrl.core.diversity import vendi_score
    from flowrl.flow.sampler import sample

    monkeypatch.setattr(task.cfg.eval, "batch_size", batch_size)
    kw = dict(num_steps=2, kind="flow_sde", noise_level=0.7, cfg_scale=None)
    m = task._evaluate(3, 11, None, kw)
    prompts = ["a red cube", "a blue ball"]
    if batch_size == 0:  # one call for the whole set
        x = sample(task.pipe, prompts, samples_per_prompt=3, seed=11, **kw)
    else:  # chunks of 2 rows, seeded 11 + j: chunk 1 holds one sample of each prompt
        rows = [prompts[r // 3] for r in range(6)]
        x = torch.cat([sample(task.pipe, rows[a:a + 2], samples_per_prompt=1, seed=11 + j, **kw)
                       for j, a in enumerate(range(0, 6, 2))])
    f = build_features("pixels", size=64)(x)
    group = [0, 0, 0, 1, 1, 1]
    assert m["diversity"] == pytest.approx(_loop_mean_distance(f, group), rel=1e-5)
    vs, _ = vendi_score(f, torch.tensor(group), kernel="cosine", center=True)
    assert m["vendi"] == pytest.approx(float(vs.mean()), rel=1e-5)
    assert "reward" in m and not any(k.startswith("flowrl:") for k in m)
    plan = task.report_plan()
    assert {"diversity", "vendi"} <= set(plan.checks) and {"diversity", "vendi"} <= set(plan.metrics)


def test_generic_flow_eval_in_clip_space_and_not_measured_with_one_sample(task, sd3_dir, tiny_clip, monkeypatch):
    from flowrl.train.flow_eval import eval_features

    monkeypatch.setattr(task.cfg.eval, "diversity_features", dict(tiny_clip))
    monkeypatch.setattr(task, "eval_features", eval_features(dict(tiny_clip)))  # as the task builds it
    m = task._evaluate(3, 11, None, dict(num_steps=2, kind="flow_sde", noise_level=0.7, cfg_scale=None))
    assert 0.0 < m["diversity"] <= 2.0 and 1.0 <= m["vendi"] <= 3.0, m  # unit embeddings; 3 samples per prompt
    spec = "{" + ", ".join(f"{k}: {v}" for k, v in tiny_clip.items()) + "}"
    one = _task(sd3_dir, "eval.num_per_prompt=1", f"eval.diversity_features={spec}")
    assert one.eval_features is None  # one sample per prompt: no pair, no CLIP model loaded
    assert "diversity" not in one._evaluate(1, 11, None, dict(num_steps=2, kind="ode", noise_level=0.0, cfg_scale=None))
    with pytest.raises(ValueError, match="eval.diversity_features='nope'.*pixels"):  # the task builds it with this
        eval_features("nope")


def test_two_ranks_gathered_rank_major_measure_what_one_process_measures(task, monkeypatch):
    import flowrl.train.flow_eval as fe

    sampler = task._eval_sampler(None, dict(num_steps=2, kind="flow_sde", noise_level=0.7, cfg_scale=None))
    feats = build_features("pixels", size=64)
    run = dict(batch_size=2, features=feats)
    one = fe.pop_diversity(fe.scored_eval_parts(sampler, task.reward, task.eval_prompts, 3, 7, rank=0, world=1, **run), 3)
    monkeypatch.setattr(fe, "gather_parts", lambda parts, world: parts)  # each rank's own rows
    ranks = [fe.scored_eval_parts(sampler, task.reward, task.eval_prompts, 3, 7, rank=r, world=2, **run) for r in (0, 1)]
    assert [p[fe.ROW_KEY].tolist() for p in ranks] == [[0, 1, 4, 5], [2, 3]]  # chunks 0, 2 | 1: not in row order
    gathered = fe.cat_parts(ranks)  # what gather_parts returns: rank 0's rows first
    assert fe.pop_diversity(gathered, 3) == pytest.approx(one, rel=1e-6) and set(one) == {"diversity", "vendi"}


def test_dry_run_checks_the_diversity_features(capsys):
    from flowrl.train.preflight import run_preflight

    for spec, bad in (("{name: pixels, width: 3}", "width"), ("nope", "nope"), ("clip", None)):
        rc, failures = run_preflight(load(TrainConfig, None, ["flow.model=digits", f"eval.diversity_features={spec}"]))
        mine = [f for f in failures if f.startswith("diversity: eval.diversity_features=")]
        assert (rc == 2 and len(mine) == 1 and bad in mine[0]) if bad else not mine, (spec, failures)
    assert "ok    diversity clip features, per prompt (20 samples)" in capsys.readouterr().out
