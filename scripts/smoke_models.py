"""Random-weight models of the published architectures for ``scripts/gpu_smoke.py`` (nothing is downloaded).

The hyper-parameters are in ``scripts/smoke_archs.json`` (copied from the published config.json files; "tiny" holds
CPU sizes of the same classes). Importing this module registers three flow adapters, ``smoke_sd3``,
``smoke_flux`` and ``smoke_wan``, whose ``model_path`` is ``published`` or ``tiny`` (which sizes to build), and a
stand-in reward ``smoke_standin``. The adapters are flowrl's own (SD3Pipeline, FluxPipeline, WanPipeline) over the
real diffusers / transformers classes; only the weights are random.

Text encoders: the real classes at the published sizes (CLIP-L, CLIP-G, T5-XXL encoder, UMT5-XXL encoder), so
their memory is the real one; the tokenizers are stand-ins (CLIP's real BPE vocabulary; a 70-piece T5 Unigram
vocabulary from ``flowrl.pipelines.tiny``), which changes the token ids, not any tensor's size. The LLM is a
Qwen2 causal LM of Qwen2.5-0.5B's shape with a character tokenizer padded to its 151,936-token vocabulary.
"""
from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import torch

from flowrl.pipelines.registry import register_pipeline
from flowrl.rewards.base import register_reward

ARCHS = json.loads((Path(__file__).with_name("smoke_archs.json")).read_text())
SIZES = ("published", "tiny")


def arch(model: str, size: str) -> dict:
    """The hyper-parameters of ``model`` (sd3, flux, wan, qwen) at ``size`` (published | tiny)."""
    if size not in SIZES:
        raise ValueError(f"smoke model size {size!r}: valid: {list(SIZES)} (give it as flow.model_path)")
    return ARCHS["tiny"][model] if size == "tiny" else ARCHS[model]


@contextlib.contextmanager
def on_device(device):
    """Build modules directly on ``device`` (a 12B transformer initialised on the CPU would take minutes)."""
    with torch.device(device):
        yield


def _frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(dtype).requires_grad_(False).eval()


def _clip(spec: dict, with_projection: bool, device, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **spec)
    with on_device(device):
        enc = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    return _frozen(enc, dtype)


def _t5(spec: dict, device, dtype, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = (UMT5Config if umt5 else T5Config)(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **spec)
    with on_device(device):
        enc = (UMT5EncoderModel if umt5 else T5EncoderModel)(cfg)
    return _frozen(enc, dtype)


def _tokenizers():
    from flowrl.pipelines.clip_vocab import build_clip_tokenizer
    from flowrl.pipelines.tiny import tiny_t5_tokenizer

    return build_clip_tokenizer(77), tiny_t5_tokenizer(512)


def _vae(spec: dict, device, dtype):
    from diffusers import AutoencoderKL

    spec = dict(spec)
    n = len(spec["block_out_channels"])
    spec.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
    spec.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    with on_device(device):
        return _frozen(AutoencoderKL(**spec), dtype)


def _transformer(cls, spec: dict, device, dtype):
    """``cls(**spec)`` in ``dtype``, except the modules the class keeps in fp32 (as ``from_pretrained`` does)."""
    with on_device(device):
        m = cls(**spec).to(dtype)
    keep = getattr(m, "_keep_in_fp32_modules", None) or []
    for name, p in m.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return m


@register_pipeline("smoke_sd3", family="flow")
def load_smoke_sd3(path, *, device="cpu", dtype=torch.float32, **options):
    """SD3.5-medium's architecture (or tiny) with random weights through flowrl's SD3Pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from flowrl.pipelines.sd3 import SD3Pipeline

    a = arch("sd3", str(path))
    clip_tok, t5_tok = _tokenizers()
    torch.manual_seed(0)
    return SD3Pipeline(_transformer(SD3Transformer2DModel, a["transformer"], device, dtype),
                       FlowMatchEulerDiscreteScheduler(**a["scheduler"]),
                       clip=[(clip_tok, _clip(a["clip_l"], True, device, dtype)),
                             (clip_tok, _clip(a["clip_g"], True, device, dtype))],
                       t5=(t5_tok, _t5(a["t5"], device, dtype)), vae=_vae(a["vae"], device, dtype),
                       max_sequence_length=a["max_sequence_length"], device=device, dtype=dtype, **options)


@register_pipeline("smoke_flux", family="flow")
def load_smoke_flux(path, *, device="cpu", dtype=torch.float32, **options):
    """FLUX.1-dev's architecture (or tiny) with random weights through flowrl's FluxPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from flowrl.pipelines.flux import FluxPipeline

    a = arch("flux", str(path))
    clip_tok, t5_tok = _tokenizers()
    torch.manual_seed(0)
    return FluxPipeline(_transformer(FluxTransformer2DModel, a["transformer"], device, dtype),
                        FlowMatchEulerDiscreteScheduler(**a["scheduler"]), _vae(a["vae"], device, dtype),
                        clip=(clip_tok, _clip(a["clip_l"], False, device, dtype)),
                        t5=(t5_tok, _t5(a["t5"], device, dtype)), max_sequence_length=a["max_sequence_length"],
                        device=device, dtype=dtype, **options)


@register_pipeline("smoke_wan", family="flow")
def load_smoke_wan(path, *, device="cpu", dtype=torch.float32, **options):
    """Wan2.1-T2V-1.3B's architecture (or tiny) with random weights through flowrl's WanPipeline (VAE in fp32,
    as the adapter loads it)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from flowrl.pipelines.wan import WanPipeline

    a = arch("wan", str(path))
    _, t5_tok = _tokenizers()
    torch.manual_seed(0)
    with on_device(device):
        vae = _frozen(AutoencoderKLWan(**a["vae"]), torch.float32)
    return WanPipeline(_transformer(WanTransformer3DModel, a["transformer"], device, dtype),
                       UniPCMultistepScheduler(**a["scheduler"]), vae, text=(t5_tok, _t5(a["umt5"], device, dtype, umt5=True)),
                       max_sequence_length=a["max_sequence_length"], device=device, dtype=dtype, **options)


def write_qwen(directory: Path, size: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A Qwen2 causal LM of Qwen2.5-0.5B's shape (or tiny) with random weights, saved like a hub checkpoint with a
    character tokenizer (printable ASCII, special tokens, fillers up to the model's vocabulary) and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = arch("qwen", size)["model"]
    specials = ["<pad>", "<eos>", "<unk>"]
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    for i in range(len(vocab), spec["vocab_size"]):  # every id the model can sample decodes to something
        vocab[f"<t{i}>"] = i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  padding_side="left")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(pad_token_id=0, eos_token_id=1, bos_token_id=None, **spec))
    model.to(dtype).save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


@register_reward("smoke_standin")
def smoke_standin(samples, prompts, meta):
    """Stand-in for a learned image / video reward (PickScore, HPS, CLIP score): the same call signature and
    output (float [B]), scored as the mean brightness of each sample. Used when the real weights are not cached."""
    x = samples.float()
    return x.flatten(1).mean(1)


# component name in a diffusers repo -> (library, class, key of the hyper-parameters in smoke_archs.json)
REPO_LAYOUT = {
    "sd3": {"transformer": ("diffusers", "SD3Transformer2DModel", "transformer"),
            "vae": ("diffusers", "AutoencoderKL", "vae"),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", "clip_l"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", "clip_g"),
            "text_encoder_3": ("transformers", "T5EncoderModel", "t5")},
    "flux": {"transformer": ("diffusers", "FluxTransformer2DModel", "transformer"),
             "vae": ("diffusers", "AutoencoderKL", "vae"),
             "text_encoder": ("transformers", "CLIPTextModel", "clip_l"),
             "text_encoder_2": ("transformers", "T5EncoderModel", "t5")},
    "wan": {"transformer": ("diffusers", "WanTransformer3DModel", "transformer"),
            "vae": ("diffusers", "AutoencoderKLWan", "vae"),
            "text_encoder": ("transformers", "UMT5EncoderModel", "umt5")},
}
CONFIG_CLASSES = {"CLIPTextModelWithProjection": "CLIPTextConfig", "CLIPTextModel": "CLIPTextConfig",
                  "T5EncoderModel": "T5Config", "UMT5EncoderModel": "UMT5Config"}


def write_config_repo(model: str, size: str, directory: Path) -> Path:
    """A diffusers repo of configs only (``model_index.json`` and each model component's ``config.json``, no
    weights) for ``model`` at ``size``: what ``flowrl train --dry-run``'s estimator reads from a real checkpoint."""
    import transformers

    a = arch(model, size)
    directory = Path(directory)
    index = {"_class_name": "DiffusionPipeline"}
    for name, (library, cls, key) in REPO_LAYOUT[model].items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        spec = dict(a[key])
        if cls == "AutoencoderKL":
            n = len(spec["block_out_channels"])
            spec.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
            spec.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
        if library == "diffusers":
            (directory / name / "config.json").write_text(json.dumps({"_class_name": cls, **spec}, indent=1))
        else:
            getattr(transformers, CONFIG_CLASSES[cls])(**spec).save_pretrained(directory / name)
        index[name] = [library, cls]
    (directory / "model_index.json").write_text(json.dumps(index, indent=1))
    return directory
