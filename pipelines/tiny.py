"""Tiny random-weight stand-ins of SD3, FLUX.1 and Wan2.1, of the real diffusers / transformers classes.

Each builder writes a complete diffusers repo (``model_index.json`` + one subfolder per component) with
``save_pretrained`` of the real pipeline class, so the adapters' ``from_pretrained`` path is exercised exactly as
with the real checkpoints, offline. Used by the tests, by ``scripts/bench_sampling.py`` and by anything that needs
a real-class model in seconds on a CPU. The CLIP tokenizer is the real one (from open_clip's BPE vocabulary);
the T5 tokenizer is a real ``T5Tokenizer`` (Unigram) over a small vocabulary.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch


# the tiny T5 tokenizer's pieces: 4 specials + 12 words + 36 letters/digits + 26 word-initial letters; the tiny
# encoders' vocabulary must cover every id it emits (with 70, any word that starts with a letter piece ran off
# the embedding table)
T5_VOCAB = 78


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A real transformers ``T5Tokenizer`` (Unigram) with a ``T5_VOCAB``-piece vocabulary: pad/eos/unk, letters, digits, words."""
    from transformers import T5Tokenizer

    words = ["a", "the", "of", "photo", "cat", "dog", "digit", "handwritten", "red", "blue", "on", "mat"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + c, -6.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_tokenizer():
    from flowrl.pipelines.clip_vocab import build_clip_tokenizer

    return build_clip_tokenizer(77)


def _clip_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")


def _tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=1.5305, shift_factor=0.0609)


def build_tiny_sd3(directory: str | os.PathLike, *, seed: int = 0, with_t5: bool = True, shift: float = 3.0) -> Path:
    """Tiny SD3 (SD3Transformer2DModel 2 layers, CLIP-L/CLIP-G/T5 encoders, AutoencoderKL 2x) saved to ``directory``.

    Default image: 16x16 pixels -> latents [B, 4, 8, 8]; joint attention width 32, pooled width 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    text_encoder = CLIPTextModelWithProjection(_clip_config(8, 8))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, 8))
    t5 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)) if with_t5 else None
    tok = _clip_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=_tiny_vae(4), text_encoder=text_encoder, tokenizer=tok,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tok, text_encoder_3=t5,
                                    tokenizer_3=tiny_t5_tokenizer() if with_t5 else None)
    pipe.save_pretrained(str(directory))
    return Path(directory)


def build_tiny_flux(directory: str | os.PathLike, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Tiny FLUX.1 (FluxTransformer2DModel 1+1 layers, CLIP + T5, AutoencoderKL 2x) saved to ``directory``.

    Default image 16x16 -> latents 4 x 8 x 8 -> packed [B, 16, 16] (2x2 patches of 4 channels).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    t5 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(4), text_encoder=CLIPTextModel(_clip_config(8, 8)),
                        tokenizer=_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer)
    pipe.save_pretrained(str(directory))
    return Path(directory)


def build_tiny_wan(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Tiny Wan2.1 T2V (WanTransformer3DModel 1 layer, UMT5 encoder, AutoencoderKLWan 4x temporal / 8x spatial).

    Default video 5 frames of 16x16 -> latents [B, 4, 2, 2, 2].
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    z = 4
    vae = AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=z, out_channels=z, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=T5_VOCAB, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    pipe.save_pretrained(str(directory))
    return Path(directory)
