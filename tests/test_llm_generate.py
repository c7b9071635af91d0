"""flowrl.llm.generate: sampled log-probs vs teacher-forced recompute, entropies, stops, the adapter.

A tiny random Llama is built from a config, saved and loaded back with ``from_pretrained`` (offline).
"""
from __future__ import annotations

import math

import pytest
import torch

from flowrl.llm.generate import Generation, generate, stop_mask, token_logprobs

VOCAB, EOS, PAD = 16, 1, 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits: a peaked, non-uniform policy with real differences
        model.lm_head.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return m.eval()


def ragged_prompts(gen, lengths=(3, 7, 1, 5, 8, 2, 6, 4)):
    """Left-padded random prompts (no EOS/PAD inside) of the given lengths."""
    B, P = len(lengths), max(lengths)
    ids = torch.full((B, P), PAD, dtype=torch.long)
    am = torch.zeros((B, P), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(2, VOCAB, (n,), generator=gen)
        am[i, P - n:] = 1
    return ids, am


def full_logits(model, ids, am):
    """Reference: one forward pass over each row alone, without padding (natural positions)."""
    out = []
    for i in range(ids.shape[0]):
        keep = am[i].bool()
        out.append(model(input_ids=ids[i, keep][None]).logits[0].float())
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logp_matches_teacher_forced(tiny, gen, temperature):
    ids, am = ragged_prompts(gen)
    g = generate(tiny, ids, am, max_new_tokens=16, temperature=temperature, generator=gen)
    mask = g.completion_mask
    # the batch has rows that stopped on EOS and rows cut at the length limit
    assert bool(g.truncated.any()) and bool((~g.truncated).any())
    assert bool((g.lengths < g.completion_ids.shape[1]).any())
    with torch.no_grad():
        re_logp, re_ent = token_logprobs(tiny, g.input_ids, g.attention_mask, mask,
                                         temperature=temperature, with_entropy=True)
    err = (g.logp - re_logp).abs()[mask]
    assert float(err.max()) < 1e-5
    assert float((g.entropy - re_ent).abs()[mask].max()) < 1e-5
    assert bool((re_logp[~mask] == 0).all()) and bool((g.logp[~mask] == 0).all())
    # and against an unpadded forward of each row alone, by hand: log softmax(z / tau)[y]
    with torch.no_grad():
        for b, logits in enumerate(full_logits(tiny, g.input_ids, g.attention_mask)):
            n_prompt = int(am[b].sum())
            for t in range(int(g.lengths[b])):
                z = logits[n_prompt - 1 + t] / temperature
                y = int(g.completion_ids[b, t])
                ref = float(z[y]) - math.log(sum(math.exp(float(v)) for v in z))
                assert abs(float(g.logp[b, t]) - ref) < 1e-5


def test_eos_stop_and_padding(tiny, gen):
    ids, am = ragged_prompts(gen)
    g = generate(tiny, ids, am, max_new_tokens=16, generator=gen)
    T = g.completion_ids.shape[1]
    for b in range(ids.shape[0]):
        row = g.completion_ids[b].tolist()
        n = int(g.lengths[b])
        if EOS in row[:n]:
            assert row.index(EOS) == n - 1 and not bool(g.truncated[b])
            assert all(v == PAD for v in row[n:])
        else:
            assert n == T and bool(g.truncated[b])
        assert g.completion_mask[b].tolist() == [True] * n + [False] * (T - n)
    # hand case of stop_mask: EOS kept, everything after it masked; a row without EOS is all True
    c = torch.tensor([[5, 1, 7, 1], [4, 4, 4, 4], [1, 0, 0, 0]])
    assert stop_mask(c, [1]).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert stop_mask(torch.tensor([[5, 2, 3]]), [2, 3]).tolist() == [[True, True, False]]


def test_entropy_by_hand(tiny, gen):
    ids, am = ragged_prompts(gen, lengths=(4, 2, 6))
    tau = 0.8
    g = generate(tiny, ids, am, max_new_tokens=6, temperature=tau, generator=gen)
    with torch.no_grad():
        logits = full_logits(tiny, g.input_ids, g.attention_mask)
    for b in range(ids.shape[0]):
        n_prompt = int(am[b].sum())
        for t in range(int(g.lengths[b])):
            z = [float(v) / tau for v in logits[b][n_prompt - 1 + t]]
            zmax = max(z)
            w = [math.exp(v - zmax) for v in z]
            p = [x / sum(w) for x in w]
            h = -sum(pi * math.log(pi) for pi in p if pi > 0)
            assert abs(float(g.entropy[b, t]) - h) < 1e-5
        assert bool((g.entropy[b, int(g.lengths[b]):] == 0).all())


def test_greedy_is_argmax_and_padding_invariant(tiny, gen):
    ids, am = ragged_prompts(gen, lengths=(5, 2, 8, 3))
    g = generate(tiny, ids, am, max_new_tokens=10, temperature=0.0)
    assert g.temperature == 1.0
    with torch.no_grad():
        logits = full_logits(tiny, g.input_ids, g.attention_mask)
    for b in range(ids.shape[0]):
        n_prompt = int(am[b].sum())
        for t in range(int(g.lengths[b])):
            assert int(g.completion_ids[b, t]) == int(logits[b][n_prompt - 1 + t].argmax())
        # the same prompt alone (no padding) gives the same tokens and log-probs
        keep = am[b].bool()
        solo = generate(tiny, ids[b, keep][None], am[b, keep][None], max_new_tokens=10, temperature=0.0)
        n = int(g.lengths[b])
        assert solo.completion_ids[0, :n].tolist() == g.completion_ids[b, :n].tolist()
        assert float((solo.logp[0, :n] - g.logp[b, :n]).abs().max()) < 1e-5


def test_top_k_sampler_logp_and_is_weight(tiny, gen):
    from flowrl.core.losses import importance_weights

    ids, am = ragged_prompts(gen, lengths=(3, 5, 2))
    k = 3
    g = generate(tiny, ids, am, max_new_tokens=8, temperature=1.0, top_k=k, generator=gen)
    assert g.sampler_logp is not None
    with torch.no_grad():
        logits = full_logits(tiny, g.input_ids, g.attention_mask)
    for b in range(ids.shape[0]):
        n_prompt = int(am[b].sum())
        for t in range(int(g.lengths[b])):
            z = logits[b][n_prompt - 1 + t]
            p = torch.softmax(z.double(), -1)
            top = torch.topk(p, k)
            y = int(g.completion_ids[b, t])
            assert y in top.indices.tolist()
            z_s = float(top.values.sum())  # kept mass
            assert abs(float(g.sampler_logp[b, t]) - (math.log(float(p[y])) - math.log(z_s))) < 1e-5
            assert abs(float(g.logp[b, t]) - math.log(float(p[y]))) < 1e-5
    w, _ = importance_weights(g.logp, g.sampler_logp, g.completion_mask, c_max=10.0)
    assert bool((w[g.completion_mask] <= 1 + 1e-6).all())
    # no truncation: no sampler_logp
    assert generate(tiny, ids, am, max_new_tokens=4, generator=gen).sampler_logp is None


def test_generator_seeds_and_restores_global_rng(tiny, gen):
    ids, am = ragged_prompts(gen, lengths=(3, 4))
    state = torch.random.get_rng_state()
    a = generate(tiny, ids, am, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    b = generate(tiny, ids, am, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logp, b.logp)


def test_bad_inputs_raise(tiny, gen):
    ids, am = ragged_prompts(gen, lengths=(3, 4))
    right = am.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(tiny, ids, right, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, ids, am, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, ids, am, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, ids, am, max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="completion_mask"):
        token_logprobs(tiny, ids, am, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(tiny, ids, am, torch.ones(2, 2, dtype=torch.bool), temperature=0.0)


# ----------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def char_lm_dir(tmp_path_factory):
    """A random Llama with the arithmetic character tokenizer, saved like a hub checkpoint."""
    from transformers import LlamaForCausalLM

    from flowrl.pipelines import arithmetic as ar

    torch.manual_seed(1)
    tok = ar.build_tokenizer()
    cfg = ar.model_config(len(tok))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 64, 2
    d = tmp_path_factory.mktemp("char_lm")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_causal_lm_adapter_roundtrip(char_lm_dir, gen):
    from flowrl.pipelines.causal_lm import CausalLMPipeline, load_causal_lm

    pipe = load_causal_lm(str(char_lm_dir))
    assert isinstance(pipe, CausalLMPipeline) and pipe.tokenizer.padding_side == "left"
    ids, am = pipe.build_prompts(["Q:1+2\n", "Q:123+456\n"])
    assert am[0].tolist() == [0, 0, 0, 0] + [1] * 6 and am[1].tolist() == [1] * 10
    g = pipe.generate(["Q:1+2\n", "Q:123+456\n"], max_new_tokens=12, generator=gen, num_samples=3)
    assert isinstance(g, Generation) and g.completion_ids.shape[0] == 6
    assert torch.equal(g.prompt_ids[0], g.prompt_ids[2]) and torch.equal(g.prompt_ids[3], g.prompt_ids[5])
    re_logp = pipe.logprobs(g)
    assert re_logp.requires_grad
    assert float((re_logp.detach() - g.logp).abs()[g.completion_mask].max()) < 1e-5
    texts = pipe.decode(g)
    for b, text in enumerate(texts):
        kept = g.completion_ids[b, g.completion_mask[b]].tolist()
        assert text == "".join(pipe.tokenizer.convert_ids_to_tokens([i for i in kept if i not in (0, 1, 2)]))
    with pytest.raises(ValueError, match="backend"):
        load_causal_lm(str(char_lm_dir), backend="onnx")
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(str(char_lm_dir), dtype="float8")


def test_causal_lm_lora(char_lm_dir, gen):
    from peft import PeftModel

    from flowrl.pipelines.causal_lm import load_causal_lm

    base = load_causal_lm(str(char_lm_dir))
    pipe = load_causal_lm(str(char_lm_dir), lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert isinstance(pipe.model, PeftModel)
    trainable = [n for n, p in pipe.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    g = pipe.generate(["Q:12+34\n"] * 3, max_new_tokens=10, generator=gen)
    # LoRA's B starts at zero: the wrapped model equals the base model
    with torch.no_grad():
        ref = base.logprobs(g)
    logp = pipe.logprobs(g)
    assert float((logp.detach() - ref).abs()[g.completion_mask].max()) < 1e-5
    (-(logp * g.completion_mask).sum()).backward()
    grads = [p.grad for n, p in pipe.model.named_parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads) and any(float(gr.abs().sum()) > 0 for gr in grads)


def test_causal_lm_training_plumbing_reference_and_export(char_lm_dir, gen, tmp_path):
    """What the trainer asks of an LLM adapter (flowrl.llm.LLMPipeline), through the registry: the reference policy
    under LoRA is the model with its adapters off (equal to the base model after a step that moved the adapters),
    and the export loads back with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from flowrl.llm import LLMPipeline
    from flowrl.pipelines.registry import load_pipeline

    base = load_pipeline("causal_lm", str(char_lm_dir), family="llm", dtype="float32", device="cpu")
    assert isinstance(base, LLMPipeline) and not base.is_lora and not base.external_sampler
    base.sync_sampler()  # no external sampler: nothing to do
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with base.adapters_disabled():
            pass
    base.export(tmp_path / "full")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), base.model.state_dict().values()))
    assert (tmp_path / "full" / "model" / "tokenizer.json").is_file()

    pipe = load_pipeline("causal_lm", str(char_lm_dir), family="llm", dtype="float32", device="cpu",
                         lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert pipe.is_lora
    g = pipe.generate(["Q:12+34\n"] * 3, max_new_tokens=10, generator=gen)
    opt = torch.optim.SGD([p for p in pipe.model.parameters() if p.requires_grad], lr=1.0)
    (-(pipe.logprobs(g) * g.completion_mask).sum()).backward()
    opt.step()
    with torch.no_grad():
        moved = pipe.logprobs(g)
        with pipe.adapters_disabled() as ref_model:
            ref = pipe.logprobs(g, model=ref_model)
        want = base.logprobs(g)
    m = g.completion_mask
    assert float((ref - want).abs()[m].max()) < 1e-5 and float((moved - want).abs()[m].max()) > 1e-3
    pipe.export(tmp_path / "lora_run")
    assert (tmp_path / "lora_run" / "lora" / "adapter_config.json").is_file()
    # load_export is export's inverse: a fresh LoRA model gets the moved adapters back, a fresh full model the weights
    fresh = load_pipeline("causal_lm", str(char_lm_dir), family="llm", dtype="float32", device="cpu",
                          lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    fresh.load_export(tmp_path / "lora_run")
    with torch.no_grad():
        torch.testing.assert_close(fresh.logprobs(g), moved)
    full = load_pipeline("causal_lm", str(char_lm_dir), family="llm", dtype="float32", device="cpu")
    with torch.no_grad():
        for p in full.model.parameters():
            p.add_(0.5)
    full.load_export(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), base.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no LoRA export"):
        fresh.load_export(tmp_path / "full")


# ----------------------------------------------------------------------------- vLLM backend (error path only)
def test_vllm_backend_missing_raises_clear_import_error(monkeypatch, char_lm_dir):
    import sys

    from flowrl.llm import vllm_backend
    from flowrl.pipelines.causal_lm import load_causal_lm

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed
    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_backend.VLLMGenerator("some/model", tokenizer=None)
    with pytest.raises(ImportError, match="backend='transformers'"):
        load_causal_lm(str(char_lm_dir), backend="vllm")


def test_model_generation_config_does_not_leak(tiny_dir, gen):
    """A checkpoint's generation_config (top_k=1, repetition penalty, temperature) must not change sampling."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    m.generation_config.top_k = 1
    m.generation_config.top_p = 0.5
    m.generation_config.temperature = 0.1
    m.generation_config.repetition_penalty = 3.0
    ids, am = ragged_prompts(gen)
    g = generate(m, ids, am, max_new_tokens=12, temperature=1.0, generator=gen)
    greedy = generate(m, ids, am, max_new_tokens=12, temperature=0.0)
    assert g.sampler_logp is None
    assert not torch.equal(g.completion_ids, greedy.completion_ids)  # top_k=1 would make them equal
    with torch.no_grad():
        re = token_logprobs(m, g.input_ids, g.attention_mask, g.completion_mask)
    assert float((re - g.logp).abs()[g.completion_mask].max()) < 1e-5
    # a greedy step is the argmax of the raw logits (no repetition penalty): checked by recompute
    with torch.no_grad():
        logits = full_logits(m, greedy.input_ids, greedy.attention_mask)
    for b in range(ids.shape[0]):
        n_prompt = int(am[b].sum())
        for t in range(int(greedy.lengths[b])):
            assert int(greedy.completion_ids[b, t]) == int(logits[b][n_prompt - 1 + t].argmax())
    m.generation_config.suppress_tokens = [3]
    with pytest.raises(ValueError, match="suppress_tokens"):
        generate(m, ids, am, max_new_tokens=4)
