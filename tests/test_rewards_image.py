"""Image rewards: tiny random-weight models through the real loading code, offline; exact JPEG sizes;
the interface (registry, weights, failure policy) and the missing-weights error."""
from __future__ import annotations

import io
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

torch.set_num_threads(1)

import huggingface_hub.constants as hf_constants  # noqa: E402

from flowrl.rewards import MissingWeightsError, RewardError, build_reward, build_rewards, register_reward  # noqa: E402
from flowrl.rewards.base import REWARDS  # noqa: E402

TINY = "flowrl-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip config registered under TINY, and its random weights as a local safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("oc")
    (d / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(d / f"{TINY}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = d / "tiny.safetensors"
    save_file(sd, str(path))
    torch.save({"state_dict": sd}, str(d / "hps.pt"))
    return {"safetensors": str(path), "hps": str(d / "hps.pt"), "dir": d}


def _images(B=3, size=32, seed=0):
    """Images with values k/255, so the PIL round trip of the reference transform is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, size, size), generator=g).float() / 255.0


def _ref_open_clip_cos(model_name, pretrained, images, prompts, checkpoint=None):
    """Reference: open_clip's own PIL preprocessing and encoders, cosine per pair (loops)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    tok = open_clip.get_tokenizer(model_name)
    out = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            pil = Image.fromarray((images[i] * 255).round().byte().permute(1, 2, 0).numpy())
            a = model.encode_image(preprocess(pil)[None])[0]
            b = model.encode_text(tok([prompts[i]]))[0]
            out.append(float(a @ b / (a.norm() * b.norm())))
    return torch.tensor(out), model


PROMPTS = ["a red cube", "two dogs on grass", "a painting of the sea"]


def test_clip_score_matches_open_clip_reference(tiny_open_clip):
    x = _images()
    r = build_reward("clip", model_name=TINY, pretrained=tiny_open_clip["safetensors"], device="cpu")
    got = r(x, PROMPTS)
    ref, _ = _ref_open_clip_cos(TINY, tiny_open_clip["safetensors"], x, PROMPTS)
    assert set(got) == {"clip"}
    torch.testing.assert_close(got["clip"], ref, atol=1e-5, rtol=1e-4)
    # PIL input gives the same, a scale multiplies
    pil = [Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy()) for i in range(3)]
    torch.testing.assert_close(r(pil, PROMPTS)["clip"], ref, atol=1e-5, rtol=1e-4)
    r2 = build_reward("clip", model_name=TINY, pretrained=tiny_open_clip["safetensors"], device="cpu", scale=2.5)
    torch.testing.assert_close(r2(x, PROMPTS)["clip"], 2.5 * ref, atol=1e-5, rtol=1e-4)


def test_clip_score_resizes_and_is_differentiable(tiny_open_clip):
    r = build_reward("clip", model_name=TINY, pretrained=tiny_open_clip["safetensors"], device="cpu")
    x = torch.rand(2, 3, 48, 64, requires_grad=True)  # non-square, larger: resize + centre crop
    s = r.score(x, PROMPTS[:2], None)["clip"]
    assert s.shape == (2,)
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hpsv2_loads_checkpoint_into_open_clip(tiny_open_clip):
    x = _images(seed=1)
    r = build_reward("hpsv2", checkpoint=tiny_open_clip["hps"], model_name=TINY, device="cpu")
    ref, _ = _ref_open_clip_cos(TINY, None, x, PROMPTS, checkpoint=tiny_open_clip["hps"])
    torch.testing.assert_close(r(x, PROMPTS)["hpsv2"], ref, atol=1e-5, rtol=1e-4)


def test_aesthetic_head_over_clip_embedding(tiny_open_clip, tmp_path):
    import open_clip

    torch.manual_seed(3)
    dims = [16, 1024, 128, 64, 16, 1]
    sd = {}
    for j, idx in enumerate([0, 2, 4, 6, 7]):  # the published layer indices
        sd[f"layers.{idx}.weight"] = torch.randn(dims[j + 1], dims[j]) / dims[j] ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(dims[j + 1])
    torch.save(sd, tmp_path / "head.pth")
    r = build_reward("aesthetic", head=str(tmp_path / "head.pth"), clip_model=TINY,
                     clip_pretrained=tiny_open_clip["safetensors"], device="cpu")
    x = _images(seed=2)
    got = r(x, ["", "", ""])["aesthetic"]
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=tiny_open_clip["safetensors"])
    model.eval()
    ref = []
    with torch.no_grad():
        for i in range(3):
            pil = Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy())
            h = model.encode_image(preprocess(pil)[None])[0]
            h = h / h.norm()
            for idx in [0, 2, 4, 6, 7]:  # linear layers only (dropout is identity in eval)
                h = sd[f"layers.{idx}.weight"] @ h + sd[f"layers.{idx}.bias"]
            ref.append(float(h[0]))
    torch.testing.assert_close(got, torch.tensor(ref), atol=1e-4, rtol=1e-4)


def _tiny_clip_tokenizer(d):
    """A real transformers CLIPTokenizer over a tiny byte-level vocabulary with a few merges."""
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    syms = [chr(c) for c in cs]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n")]
    vocab = syms + [s + "</w>" for s in syms] + ["th", "the</w>", "an", "<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)
    return tok, len(vocab)


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("ps")
    tok, V = _tiny_clip_tokenizer(d)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(d / "processor"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(d / "model"))
    return {"model": str(d / "model"), "processor": str(d / "processor")}


def test_pickscore_from_pretrained_matches_processor_reference(tiny_pickscore):
    from transformers import AutoProcessor, CLIPModel

    r = build_reward("pickscore", model=tiny_pickscore["model"], processor=tiny_pickscore["processor"], device="cpu")
    x = _images(seed=4)
    got = r(x, PROMPTS)["pickscore"]
    # reference: the authors' recipe with the processor's own PIL path, one pair at a time
    proc = AutoProcessor.from_pretrained(tiny_pickscore["processor"])
    model = CLIPModel.from_pretrained(tiny_pickscore["model"]).eval()
    ref = []
    with torch.no_grad():
        for i in range(3):
            pil = Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy())
            inp = proc(text=[PROMPTS[i]], images=[pil], return_tensors="pt", padding=True)
            out = model(**inp)
            ref.append(float(out.logits_per_image[0, 0]))  # exp(logit_scale) * cos
    torch.testing.assert_close(got, torch.tensor(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,sign", [("jpeg_compressibility", -1.0), ("jpeg_incompressibility", 1.0)])
def test_jpeg_exact_sizes(name, sign):
    x = torch.rand(4, 3, 24, 20, generator=torch.Generator().manual_seed(5))
    x[1] = 0.5  # a flat image compresses far better
    got = build_reward(name)(x, [""] * 4)[name]
    ref = []
    for i in range(4):
        arr = (x[i] * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        ref.append(sign * len(buf.getvalue()) / 1000.0)
    assert got.tolist() == pytest.approx(ref, abs=1e-6)
    assert sign * got[1] < sign * got[0]
    q50 = build_reward(name, quality=50)(x, [""] * 4)[name]
    assert (sign * q50 <= sign * got).all() and (sign * q50 < sign * got)[[0, 2, 3]].all()


def test_registry_names_and_unknown_options():
    build_reward("jpeg_compressibility")
    for n in ["clip", "pickscore", "aesthetic", "hpsv2", "jpeg_compressibility", "jpeg_incompressibility"]:
        assert n in REWARDS
    with pytest.raises(KeyError, match="unknown reward 'nope'; valid: .*'jpeg_compressibility'"):
        build_reward("nope")
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['qualty'\]; valid: \['quality', 'name', 'on_error'\]"):
        build_reward("jpeg_compressibility", qualty=90)
    with pytest.raises(ValueError, match="on_error='zero'.*valid values"):
        build_reward("jpeg_compressibility", on_error="zero")
    with pytest.raises(RewardError, match=r"must lie in \[0, 1\].*\[-1, 1\] pixels"):
        build_reward("jpeg_compressibility")(torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"])
    with pytest.raises(ValueError, match="3 samples but 2 prompts"):
        build_reward("jpeg_compressibility")(torch.rand(3, 3, 8, 8), ["a", "b"])


def test_build_rewards_weights_and_parts():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    comb = build_rewards({"jpeg_compressibility": {"weight": 0.5}, "big": {"type": "jpeg_incompressibility", "weight": 2.0}})
    outcome, parts, valid, metrics = comb.score(x, [""] * 3)
    assert set(parts) == {"jpeg_compressibility", "big"}
    sizes = build_reward("jpeg_incompressibility")(x, [""] * 3)["jpeg_incompressibility"]
    torch.testing.assert_close(outcome, -0.5 * sizes + 2.0 * sizes)
    assert valid.all() and metrics["reward/invalid"] == 0.0
    with pytest.raises(ValueError, match="needs a non-empty|non-empty mapping"):
        build_rewards({})


_calls = {"n": 0}


@register_reward("flaky_test_reward")
def _flaky(samples, prompts, meta):
    """Fails on any batch holding a prompt 'bad'; NaN where the prompt is 'nan'."""
    if "bad" in prompts:
        raise RuntimeError("model exploded")
    return torch.tensor([float("nan") if p == "nan" else float(len(p)) for p in prompts])


def test_failure_policy_raise_and_mask():
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(RewardError, match="flaky_test_reward.*model exploded"):
        build_reward("flaky_test_reward")(x, ["a", "bad", "ccc", "dd"])
    with pytest.raises(RewardError, match="non-finite score for samples \\[1\\]"):
        build_reward("flaky_test_reward")(x, ["a", "nan", "ccc", "dd"])
    m = build_reward("flaky_test_reward", on_error="mask")
    out = m(x, ["a", "bad", "ccc", "nan"])
    assert out["flaky_test_reward/valid"].tolist() == [True, False, True, False]
    v = out["flaky_test_reward"]
    assert v[0] == 1.0 and v[2] == 3.0 and torch.isnan(v[1]) and torch.isnan(v[3])  # never a silent zero
    comb = build_rewards({"flaky_test_reward": {"weight": 1.0, "on_error": "mask"}, "jpeg_compressibility": 0.0})
    outcome, parts, valid, metrics = comb.score(x, ["a", "bad", "ccc", "nan"])
    assert valid.tolist() == [True, False, True, False] and metrics["reward/invalid"] == 2.0
    assert metrics["reward/flaky_test_reward/invalid"] == 2.0
    assert torch.isnan(outcome[1]) and outcome[0] == pytest.approx(1.0 + 0.0 * parts["jpeg_compressibility"][0].item())


def test_missing_weights_offline_fail_fast(tmp_path):
    import time

    t = time.monotonic()
    with pytest.raises(MissingWeightsError, match="not-a-real-org/PickScore_missing.*local directory"):
        build_reward("pickscore", model="not-a-real-org/PickScore_missing", processor=str(tmp_path / "none"))
    with pytest.raises(MissingWeightsError, match="open_clip ViT-B-32/openai.*pretrained='/path/to/ViT-B-32"):
        build_reward("clip", model_name="ViT-B-32", pretrained="openai")
    with pytest.raises(MissingWeightsError, match="HPSv2: no weight path given.*HPS_v2.1_compressed.pt"):
        build_reward("hpsv2")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_reward("aesthetic", head=str(tmp_path / "missing.pth"))
    assert time.monotonic() - t < 30.0  # no hang, no download
