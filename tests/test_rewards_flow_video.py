"""Video rewards (frame average, temporal consistency) and flow process rewards (model wrapper, noisy-digits
PRM, ODE completion) and the digits outcome reward, against loop references."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from flowrl.rewards import RewardError, build_process_reward, build_reward, register_reward  # noqa: E402
from flowrl.rewards.base import PROCESS_REWARDS, REWARDS  # noqa: E402

TINY = "flowrl-test-tiny-clip-v"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_names_registered():
    build_reward("jpeg_compressibility")  # loads every reward module
    for n in ["video_frames", "temporal_consistency", "digits", "remote"]:
        assert n in REWARDS
    for n in ["model", "digits_noisy", "ode_completion"]:
        assert n in PROCESS_REWARDS


@register_reward("video_test_parts")
def _parts(samples, prompts, meta):
    """Mean pixel, and a second part: the max pixel."""
    return {"video_test_parts": samples.flatten(1).mean(1), "video_test_parts/max": samples.flatten(1).amax(1)}


def test_frame_average_matches_loop():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 5, 3, 12, 12, generator=g)
    r = build_reward("video_frames", image="jpeg_incompressibility", name="vid_jpeg")
    got = r(v, ["a", "b", "c"])["vid_jpeg"]
    one = build_reward("jpeg_incompressibility")
    ref = [sum(float(one(v[b, f][None], [""])["jpeg_incompressibility"][0]) for f in range(5)) / 5 for b in range(3)]
    assert got.tolist() == pytest.approx(ref, abs=1e-6)
    r2 = build_reward("video_frames", image="video_test_parts", frame_stride=2)
    out = r2(v, ["a", "b", "c"])
    assert set(out) == {"video_frames", "video_frames/max"}
    for b in range(3):
        frames = [0, 2, 4]
        assert float(out["video_frames"][b]) == pytest.approx(sum(float(v[b, f].mean()) for f in frames) / 3, abs=1e-6)
        assert float(out["video_frames/max"][b]) == pytest.approx(sum(float(v[b, f].max()) for f in frames) / 3, abs=1e-6)
    with pytest.raises(RewardError, match=r"videos float \[B, F, C, H, W\]"):
        r(torch.rand(2, 3, 8, 8), ["a", "b"])


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ocv")
    (d / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(d / f"{TINY}.json"))
    torch.manual_seed(1)
    m = open_clip.create_model(TINY, pretrained=None)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "w.safetensors"))
    return str(d / "w.safetensors")


def test_temporal_consistency_matches_open_clip_loop(tiny_clip_path):
    import open_clip

    g = torch.Generator().manual_seed(2)
    v = torch.randint(0, 256, (2, 4, 3, 32, 32), generator=g).float() / 255
    v[1] = v[1, :1]  # a still video: every pair identical
    r = build_reward("temporal_consistency", model_name=TINY, pretrained=tiny_clip_path, device="cpu")
    got = r(v, ["", ""])["temporal_consistency"]
    model, _, pre = open_clip.create_model_and_transforms(TINY, pretrained=tiny_clip_path)
    model.eval()
    ref = []
    with torch.no_grad():
        for b in range(2):
            e = []
            for f in range(4):
                pil = Image.fromarray((v[b, f] * 255).round().byte().permute(1, 2, 0).numpy())
                h = model.encode_image(pre(pil)[None])[0]
                e.append(h / h.norm())
            ref.append(sum(float(e[f] @ e[f + 1]) for f in range(3)) / 3)
    torch.testing.assert_close(got, torch.tensor(ref), atol=1e-5, rtol=1e-4)
    assert float(got[1]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RewardError, match="at least 2 frames"):
        r(v[:, :1], ["", ""])


def test_model_process_reward_checks_and_gradient():
    w = torch.randn(1, 2, 3, 3)
    pr = build_process_reward("model", fn=lambda x, s, c: (x * w).flatten(1).sum(1) * (1 - s) + c["y"])
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    s = torch.tensor([0.1, 0.5, 0.9, 0.3])
    y = torch.randn(4)
    r = pr(x, s, {"y": y})
    ref = torch.stack([(x[b] * w[0]).sum() * (1 - s[b]) + y[b] for b in range(4)])
    torch.testing.assert_close(r, ref)
    r.sum().backward()
    torch.testing.assert_close(x.grad, w.expand(4, -1, -1, -1) * (1 - s).view(4, 1, 1, 1))
    assert pr.differentiable
    bad = build_process_reward("model", fn=lambda x, s, c: torch.zeros(3))
    with pytest.raises(RewardError, match=r"float \[B\] = \(4,\)"):
        bad(x, s, {})
    nan = build_process_reward("model", fn=lambda x, s, c: torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(RewardError, match=r"non-finite value for samples \[1\]"):
        nan(x, s, {})


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Random-weight digit classifiers written in the shipped format, loaded back through pipelines/digits.py."""
    from safetensors.torch import save_file

    from flowrl.pipelines.digits import DigitClassifier, NoisyDigitClassifier

    d = tmp_path_factory.mktemp("digits")
    torch.manual_seed(3)
    for name, model in (("classifier", DigitClassifier(width=8)), ("noisy_classifier", NoisyDigitClassifier(width=8))):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / f"{name}.safetensors"))
        (d / f"{name}.json").write_text(json.dumps(model.config()))
    return d


def test_digits_outcome_reward(digits_dir):
    from flowrl.pipelines.digits import digit_prompts, load_digit_classifier

    clf = load_digit_classifier(directory=digits_dir)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    digits = torch.tensor([0, 3, 3, 9, 5, 1])
    r = build_reward("digits", directory=str(digits_dir))
    from_prompts = r(x, digit_prompts(digits))
    from_meta = r(x, [""] * 6, {"digit": digits})
    for b in range(6):
        p = torch.softmax(clf(x[b : b + 1])[0], -1)
        assert float(from_prompts["digits"][b]) == pytest.approx(float(p[digits[b]]), abs=1e-6)
        assert float(from_prompts["digits/accuracy"][b]) == float(int(p.argmax()) == int(digits[b]))
    torch.testing.assert_close(from_meta["digits"], from_prompts["digits"])
    with pytest.raises(RewardError, match="not of the form"):
        r(x, ["a cat"] * 6)


def test_digits_noisy_process_reward(digits_dir):
    from flowrl.pipelines.digits import load_noisy_digit_classifier

    clf = load_noisy_digit_classifier(directory=digits_dir)
    pr = build_process_reward("digits_noisy", directory=str(digits_dir))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    s = torch.tensor([0.9, 0.5, 0.2, 0.0])
    d = torch.tensor([1, 7, 7, 2])
    r = pr(x, s, {"digit": d})
    for b in range(4):
        ref = torch.log_softmax(clf(x[b : b + 1].detach(), s[b : b + 1])[0], -1)[d[b]]
        assert float(r[b].detach()) == pytest.approx(float(ref.detach()), abs=1e-5)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    prob = build_process_reward("digits_noisy", directory=str(digits_dir), output="prob")(x, s, {"digit": d})
    torch.testing.assert_close(prob, r.exp())
    with pytest.raises(KeyError, match="cond has no 'digit'"):
        pr(x, s, {})


class ToyPipeline:
    """A linear flow model: v(x, sigma, c) = A x + sigma * c["shift"]; decode = sigmoid."""

    def __init__(self):
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.A = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
        self.trainable = torch.nn.Linear(1, 1)

    def encode_prompts(self, prompts, *, cfg=False):
        return {"shift": torch.tensor([[float(len(p)), -1.0] for p in prompts])}

    def velocity(self, x, sigma, cond, *, cfg_scale=None):
        return x @ self.A.T + sigma[:, None] * cond["shift"]

    def initial_noise(self, batch_size, *, generator=None):
        return torch.randn(batch_size, 2, generator=generator)

    def sigmas(self, num_steps):
        return torch.linspace(1, 0, num_steps + 1)

    def decode(self, x):
        return torch.sigmoid(x)


@register_reward("flow_test_first")
def _first(samples, prompts, meta):
    """The first coordinate of a decoded toy sample."""
    return samples[:, 0]


def test_ode_completion_matches_euler_loop():
    from flowrl.flow.sampler import rollout

    pipe = ToyPipeline()
    pr = build_process_reward("ode_completion", pipeline=pipe, reward="flow_test_first")
    assert not pr.differentiable
    K = 4
    sig = pipe.sigmas(K)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    cond = pipe.encode_prompts(["a", "bb", "ccc"])

    def ref_complete(x0, start, cond):
        out = []
        for b in range(x0.shape[0]):
            xb = x0[b].clone()
            for k in range(start, K):
                v = pipe.A @ xb + sig[k] * cond["shift"][b]
                xb = xb + (sig[k + 1] - sig[k]) * v
            out.append(float(torch.sigmoid(xb)[0]))
        return torch.tensor(out)

    got = pr(x, sig[1].expand(3), cond, sigmas=sig)
    torch.testing.assert_close(got, ref_complete(x, 1, cond), atol=1e-6, rtol=1e-5)
    bound = build_process_reward("ode_completion", pipeline=pipe, reward="flow_test_first", sigmas=sig)
    torch.testing.assert_close(bound(x, sig[1].expand(3), cond), got)
    with pytest.raises(ValueError, match="give the schedule sigmas"):
        pr(x, sig[1].expand(3), cond)
    with pytest.raises(ValueError, match="not in the schedule"):
        pr(x, torch.full((3,), 0.33), cond, sigmas=sig)

    traj = rollout(pipe, ["a", "bb"], num_steps=K, samples_per_prompt=2, seed=0)
    table = pr.score_trajectory(traj, steps=[0, 2, 3])
    assert table.shape == (4, K) and torch.isnan(table[:, 1]).all()
    for k in (0, 2, 3):
        torch.testing.assert_close(table[:, k], ref_complete(traj.latents[:, k + 1], k + 1, traj.cond), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(table[:, 3], traj.samples[:, 0], atol=1e-6, rtol=1e-5)  # last state: the sample itself
