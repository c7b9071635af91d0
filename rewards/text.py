"""Text rewards: format (regular expressions over tags), math answers (math-verify), the likelihood reward
(teacher-forced log-probability of the reference answer) and a process reward model (PRM) wrapper.

Registered outcome rewards (``build_reward(name, **options)``; ``samples`` are completions ``list[str]``):

- ``format_tags``: 1 iff the completion is exactly ``<think>...</think><answer>...</answer>`` (each tag once,
  whitespace around the blocks allowed); the tags are an option.
- ``format_regex``: 1 iff a user pattern matches (``fullmatch`` or ``search``, DOTALL).
- ``math_verify``: 1 iff the answer in the completion equals ``meta["answer"][i]`` by math-verify.
- ``answer_logprob``: log p(reference answer | prompt + completion) under a causal LM (the likelihood reward).

Registered process reward (``build_process_reward("prm", ...)``): a transformers PRM that scores each
reasoning step at its boundary, ``(prompts, steps, meta) -> float [B, S]`` with NaN past a sample's last step.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flowrl.core.dtypes import torch_dtype

from .base import Meta, Parts, Reward, hub_guard, register_process_reward, register_reward
from .scoring import DeadlineScorer


def _check_texts(samples: Any, what: str = "samples") -> list[str]:
    if isinstance(samples, str) or not isinstance(samples, (list, tuple)):
        raise TypeError(f"text reward: {what} must be a list of strings; got {type(samples).__name__}")
    for i, s in enumerate(samples):
        if not isinstance(s, str):
            raise TypeError(f"text reward: {what}[{i}] is {type(s).__name__}, not str")
    return list(samples)


def _meta_list(meta: Meta, key: str, B: int, who: str) -> list:
    if meta is None or key not in meta:
        raise ValueError(f"{who}: meta[{key!r}] (one entry per sample) is required")
    v = meta[key]
    if isinstance(v, str) or len(v) != B:
        raise ValueError(f"{who}: meta[{key!r}] must have one entry per sample ({B}); got {v!r:.80}")
    return list(v)


# ---------------------------------------------------------------------------------------------- format
def tag_format_pattern(tags: Sequence[str] = ("think", "answer")) -> re.Pattern:
    """The regular expression of ``<t1>...</t1> <t2>...</t2> ...``: the blocks in this order, each tag exactly
    once (a block's body may not contain its own opening or closing tag), only whitespace outside the blocks."""
    if isinstance(tags, str) or not tags:
        raise ValueError(f"format tags must be a non-empty list of tag names; got {tags!r}")
    parts = []
    for t in tags:
        if not re.fullmatch(r"[A-Za-z_][\w\-]*", t):
            raise ValueError(f"format tag {t!r} is not a valid tag name (letters, digits, _ and -)")
        e = re.escape(t)
        parts.append(rf"<{e}>(?:(?!</?{e}>).)*</{e}>")
    return re.compile(r"\s*" + r"\s*".join(parts) + r"\s*", re.DOTALL)


def format_scores(completions: Sequence[str], pattern: re.Pattern, mode: str = "fullmatch") -> Tensor:
    """float [B]: 1 where ``pattern`` matches the completion (``fullmatch`` or ``search``), else 0."""
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"format mode={mode!r} is not valid; valid: 'fullmatch', 'search'")
    match = pattern.fullmatch if mode == "fullmatch" else pattern.search
    return torch.tensor([1.0 if match(c) else 0.0 for c in completions])


@register_reward("format_tags")
class TagFormatReward(Reward):
    """Format reward: 1 iff the completion is exactly the tag blocks ``tags`` in order (default
    ``<think>...</think><answer>...</answer>``), each tag once, only whitespace between and around; else 0.

    ``prefix`` is prepended before matching (e.g. ``"<think>"`` when the prompt already opened the block).
    """

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise",
                 tags: Sequence[str] = ("think", "answer"), prefix: str = ""):
        super().__init__(name=name, on_error=on_error)
        self.pattern = tag_format_pattern(tags)
        self.prefix = prefix

    def score(self, samples, prompts, meta) -> Parts:
        texts = [self.prefix + s for s in _check_texts(samples)]
        return {self.name: format_scores(texts, self.pattern, "fullmatch")}


def _regex_item(item: tuple[str, str, str]) -> float:
    pattern, mode, text = item  # re caches the compiled pattern in the worker
    return float(format_scores([text], re.compile(pattern, re.DOTALL), mode)[0])


@register_reward("format_regex")
class RegexFormatReward(Reward):
    """Format reward: 1 iff ``re.fullmatch(pattern, completion, DOTALL)`` (``mode="search"``: anywhere), else 0.

    A pattern with nested quantifiers can take exponential time on some texts (``(a+)+$``), and ``re`` holds
    the interpreter while it backtracks. ``timeout_s`` (a number > 0) matches each sample in a worker process
    killed at that deadline (the sample scores 0, counted in ``<name>/timeout``); None (default) matches in
    this process, for patterns known to run in linear time (the operator chooses the pattern, not the client).
    """

    def __init__(self, *, pattern: str, name: Optional[str] = None, on_error: str = "raise", mode: str = "fullmatch",
                 timeout_s: Optional[float] = None):
        super().__init__(name=name, on_error=on_error)
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"format_regex: pattern {pattern!r} is not a valid regular expression: {e}") from e
        format_scores([], self.pattern, mode)
        self.mode = mode
        self.scorer = None if timeout_s is None else DeadlineScorer(f"reward {self.name!r}", timeout_s, chunk=32)

    def score(self, samples, prompts, meta) -> Parts:
        texts = _check_texts(samples)
        if self.scorer is None:
            return {self.name: format_scores(texts, self.pattern, self.mode),
                    f"{self.name}/timeout": torch.zeros(len(texts))}
        values, late = self.scorer.map(_regex_item, [(self.pattern.pattern, self.mode, t) for t in texts])
        return {self.name: torch.tensor([0.0 if t else v for v, t in zip(values, late)]),
                f"{self.name}/timeout": torch.tensor(late, dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------- math
def extract_tag(text: str, tag: str) -> Optional[str]:
    """The body of the last ``<tag>...</tag>`` block of ``text``, or None."""
    e = re.escape(tag)
    found = re.findall(rf"<{e}>(.*?)</{e}>", text, re.DOTALL)
    return found[-1] if found else None


def _mv_kwargs() -> tuple[dict, dict]:
    # math-verify's timeouts use signal.alarm, which exists only in the main thread; elsewhere run without.
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _mv_sample(completion: str, gold: str, answer_tag: Optional[str], require_tag: bool,
               own_timeout_s: Optional[int] = None, answer_pattern: Optional[str] = None) -> tuple[float, float]:
    """(correct, parsed) of one completion by math-verify (see :func:`math_verify_scores`).
    ``own_timeout_s``: math-verify's own (signal) timeouts, when on the main thread."""
    from math_verify import parse, verify

    pk, vk = _mv_kwargs()
    if own_timeout_s is not None and not pk:
        pk, vk = {"parsing_timeout": own_timeout_s}, {"timeout_seconds": own_timeout_s}
    g = parse(str(gold), **pk)
    if not g:
        g = parse(f"${gold}$", **pk)
    if not g:
        return float("nan"), float("nan")
    if answer_pattern is not None:  # the answer is where the pattern says (the last match): a tag-free format
        found = list(re.finditer(answer_pattern, completion, re.MULTILINE))
        completion = (found[-1].group(1) if found[-1].re.groups else found[-1].group(0)) if found else ""
    body = extract_tag(completion, answer_tag) if answer_tag else None
    tagged = body is not None
    if body is None:
        body = None if (require_tag and answer_tag) else completion
    pred = parse(body, **pk) if body is not None else []
    if not pred and tagged:  # the tag's body is the answer itself: read it as math (x^2+1 needs $...$)
        pred = parse(f"${body.strip()}$", **pk)
    return (1.0 if pred and verify(g, pred, **vk) else 0.0), (1.0 if pred else 0.0)


def math_verify_scores(completions: Sequence[str], answers: Sequence[str], answer_tag: Optional[str] = "answer",
                       require_tag: bool = False) -> tuple[Tensor, Tensor]:
    """(correct float [B], parsed float [B]) by math-verify, in this process (no deadline: the reward
    :class:`MathVerifyReward` runs each sample in a worker process instead).

    The prediction is the body of the last ``<answer_tag>`` block when there is one (read bare, then as
    ``$body$``), else the whole completion (math-verify finds ``\\boxed{}`` / the last expression) or nothing
    when ``require_tag``; ``correct_i = verify(parse(gold_i), parse(pred_i))``. A gold answer that
    math-verify cannot parse (bare, then wrapped in ``$...$``) gives NaN (the reward raises or masks that
    sample): a reference that cannot be checked is never scored 0.

    math-verify reads LaTeX with its own grammar and plain expressions only from digits and operators
    (``[\\d.\\s+\\-*/^()×÷]``), so no text reaches Python's ``eval`` through it; but sympy may then compute
    without bound (``$9^{9^{9}}$``), which only a process kill stops.
    """
    rows = [_mv_sample(c, g, answer_tag, require_tag) for c, g in zip(completions, answers)]  # symbolic, one by one
    return (torch.tensor([r[0] for r in rows], dtype=torch.float32),
            torch.tensor([r[1] for r in rows], dtype=torch.float32))


def _mv_item(item: tuple) -> tuple[float, float]:
    return _mv_sample(*item)


def _mv_warm() -> None:
    """Worker initializer: import math-verify and sympy (seconds) before the first deadline starts."""
    from math_verify import parse

    parse("$1$")


@register_reward("math_verify")
class MathVerifyReward(Reward):
    """Math answer reward: 1 iff the completion's answer equals ``meta["answer"][i]`` by math-verify, else 0.

    Options: ``answer_tag`` (default ``"answer"``: read the last ``<answer>...</answer>`` block when present;
    None: the whole completion, where math-verify finds ``\\boxed{}`` or the last expression),
    ``answer_pattern`` (a regex, ``^``/``$`` per line: the answer is its last match's group 1, or the whole match
    without a group, read before ``answer_tag``; no match -> no answer. The embedded arithmetic format:
    ``"^A:(-?\\d+)$"``),
    ``require_tag`` (no tag block -> 0), ``timeout_s`` (each sample's deadline in its worker process, > 0:
    past it the worker is killed, the sample scores 0 and is counted in ``<name>/timeout``), ``workers``.
    Parts: ``<name>``, ``<name>/parsed`` (an answer was found), ``<name>/timeout``.
    An unparseable gold answer raises (or, with on_error="mask", marks the sample invalid).
    """

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise", answer_tag: Optional[str] = "answer",
                 require_tag: bool = False, timeout_s: float = 5.0, workers: int = 1,
                 answer_pattern: Optional[str] = None):
        super().__init__(name=name, on_error=on_error)
        import math_verify  # noqa: F401  (fail at construction, not at the first batch, if it is missing)

        if answer_pattern is not None:
            try:
                re.compile(answer_pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"math_verify answer_pattern={answer_pattern!r} is not a valid regex: {e}") from None
        self.answer_tag, self.require_tag, self.answer_pattern = answer_tag, require_tag, answer_pattern
        self.scorer = DeadlineScorer(f"reward {self.name!r}", timeout_s, workers, initializer=_mv_warm)

    def score(self, samples, prompts, meta) -> Parts:
        texts = _check_texts(samples)
        answers = _meta_list(meta, "answer", len(texts), f"reward {self.name!r}")
        # math-verify's own timeouts (whole seconds) set past the deadline: the kill decides, deterministically
        own = int(math.ceil(self.scorer.timeout_s)) + 1
        items = [(c, str(g), self.answer_tag, self.require_tag, own, self.answer_pattern) for c, g in zip(texts, answers)]
        values, late = self.scorer.map(_mv_item, items)
        rows = [(0.0, 0.0) if t else v for v, t in zip(values, late)]
        return {self.name: torch.tensor([r[0] for r in rows], dtype=torch.float32),
                f"{self.name}/parsed": torch.tensor([r[1] for r in rows], dtype=torch.float32),
                f"{self.name}/timeout": torch.tensor(late, dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------- model loading
def _load_lm(model: Any, tokenizer: Any, auto_cls: str, device: str, dtype: str, who: str):
    """(model, tokenizer): a path / hub id loaded with ``from_pretrained`` (offline: MissingWeightsError naming
    the id), or objects passed through."""
    import transformers

    torch_dtype(dtype, who=f"{who}: dtype")  # an unknown name fails before any loading
    if isinstance(model, str):
        how = f"build_{'process_' if 'prm' in who else ''}reward(..., model='/path/to/local/{model.split('/')[-1]}')"
        with hub_guard(model, how):
            model = getattr(transformers, auto_cls).from_pretrained(model, dtype=torch_dtype(dtype, who=f"{who}: dtype"))
        model_id = getattr(model, "name_or_path", None)
    else:
        model_id = None
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{who}: model must be a path / hub id or a transformers model; got {type(model).__name__}")
    tok_src = tokenizer if tokenizer is not None else (model_id or getattr(model, "name_or_path", None))
    if isinstance(tok_src, str):
        with hub_guard(tok_src, f"pass tokenizer='/path/to/local/tokenizer' to {who}"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_src)
    elif tok_src is None:
        raise ValueError(f"{who}: a model object needs tokenizer=... (a tokenizer or a path)")
    model = model.to(device).eval()
    return model, tokenizer


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


# ---------------------------------------------------------------------------------------------- likelihood
@register_reward("answer_logprob")
class AnswerLogProbReward(Reward):
    """Likelihood reward (arXiv 2602.03979): the teacher-forced log-probability of the reference answer a*
    after the prompt p and the completion (chain of thought) z, under a causal LM pi:

        R(z) = log pi(a* | p, z) = sum_{k=1}^{K} log pi(a*_k | p, z, a*_{<k})      (reduction="sum")
        or R(z) / K                                                                 (reduction="mean")

    Token ids: ``ctx = tok(prompt + completion + separator)`` (with the tokenizer's special tokens, e.g. BOS)
    followed by ``ans = tok(answer_template.format(answer=meta["answer"][i]), add_special_tokens=False)``;
    the two are tokenised separately so the answer's tokens are the same for every completion. Batches of
    ``batch_size`` are right-padded and run in one forward each (inference mode).

    ``model``: a local path or hub id (``AutoModelForCausalLM.from_pretrained``), or a loaded model (e.g. the
    policy itself, which gives the paper's R = log pi_theta(a*|p, z)) with ``tokenizer``.
    Parts: ``<name>`` float [B], ``<name>/num_tokens`` (K), ``<name>/mean_logprob`` (R/K).
    """

    def __init__(self, *, model: Any, tokenizer: Any = None, name: Optional[str] = None, on_error: str = "raise",
                 reduction: str = "sum", separator: str = "\n", answer_template: str = "{answer}",
                 batch_size: int = 8, device: str = "cpu", dtype: str = "float32", max_length: Optional[int] = None):
        super().__init__(name=name, on_error=on_error)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"answer_logprob: reduction={reduction!r} is not valid; valid: 'sum', 'mean'")
        if batch_size < 1:
            raise ValueError(f"answer_logprob: batch_size must be >= 1; got {batch_size}")
        if "{answer}" not in answer_template:
            raise ValueError(f"answer_logprob: answer_template {answer_template!r} must contain '{{answer}}'")
        self.model, self.tokenizer = _load_lm(model, tokenizer, "AutoModelForCausalLM", device, dtype, "answer_logprob")
        self.reduction, self.separator, self.template = reduction, separator, answer_template
        self.batch_size, self.device = batch_size, device
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)

    def token_ids(self, prompt: str, completion: str, answer: str) -> tuple[list[int], list[int]]:
        """(context ids, answer ids) of one sample."""
        ctx = self.tokenizer(prompt + completion + self.separator, add_special_tokens=True)["input_ids"]
        ans = self.tokenizer(self.template.format(answer=answer), add_special_tokens=False)["input_ids"]
        if len(ans) == 0:
            raise ValueError(f"answer_logprob: reference answer {answer!r} has no tokens")
        if len(ctx) == 0:
            raise ValueError("answer_logprob: empty context (no BOS, empty prompt and completion): nothing predicts the answer's first token")
        if self.max_length is not None and len(ctx) + len(ans) > self.max_length:
            raise ValueError(f"answer_logprob: sequence of {len(ctx) + len(ans)} tokens exceeds max_length={self.max_length}")
        return list(ctx), list(ans)

    @torch.inference_mode()
    def logprobs(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(sum of answer-token log-probs float [B], answer length long [B])."""
        pairs = [self.token_ids(p, c, str(a)) for p, c, a in zip(prompts, completions, answers)]
        total = torch.zeros(len(pairs))
        count = torch.tensor([len(a) for _, a in pairs], dtype=torch.long)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s: s + self.batch_size]
            ids, att = _pad_right([c + a for c, a in chunk], pad, self.device)
            logits = self.model(input_ids=ids, attention_mask=att).logits  # [b, L, V]
            # the logits at position t predict token t+1; answer tokens sit at [len(ctx), len(ctx)+len(ans))
            pos = torch.arange(ids.shape[1], device=ids.device)
            start = torch.tensor([len(c) for c, _ in chunk], device=ids.device)
            end = start + torch.tensor([len(a) for _, a in chunk], device=ids.device)
            tgt = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])  # target positions [b, L]
            pred = torch.zeros_like(tgt)
            pred[:, :-1] = tgt[:, 1:]  # the positions whose logits predict them
            lp = torch.log_softmax(logits[pred].float(), dim=-1)  # [N, V]
            tok_lp = lp.gather(1, ids[tgt][:, None]).squeeze(1)  # [N]
            row = torch.arange(len(chunk), device=ids.device)[:, None].expand_as(tgt)[tgt]
            total[s: s + len(chunk)] = torch.zeros(len(chunk), device=ids.device).index_add_(0, row, tok_lp).cpu()
        return total, count

    def score(self, samples, prompts, meta) -> Parts:
        texts = _check_texts(samples)
        answers = _meta_list(meta, "answer", len(texts), f"reward {self.name!r}")
        total, count = self.logprobs(prompts, texts, answers)
        mean = total / count
        return {self.name: total if self.reduction == "sum" else mean,
                f"{self.name}/num_tokens": count.float(), f"{self.name}/mean_logprob": mean}


# ---------------------------------------------------------------------------------------------- PRM
@register_process_reward("prm")
class StepPRM:
    """Process reward model wrapper: scores each reasoning step at its boundary, ``-> float [B, S]``.

    Convention (Math-Shepherd, Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step"):
    the model reads ``prompt + prompt_separator + step_1 + tag_prefix + step_tag + step_separator + step_2 +
    tag_prefix + step_tag + ...`` tokenised as one string; the **step tag** token closes each step
    (Math-Shepherd: ``"ки"`` after a space, steps separated by ``"\\n"``), and the score of step k is read at
    its tag token position p_k:

    - ``kind="causal_lm"`` (AutoModelForCausalLM): score_k = softmax(logits[p_k, [good, bad]])[0], the
      probability of the ``good_token`` ("+") against the ``bad_token`` ("-") as the next token;
    - ``kind="token_classification"`` (AutoModelForTokenClassification): score_k = softmax(logits[p_k])[positive_label]
      (sigmoid(logits[p_k, 0]) when the head has one label).

    The tag positions are found from character offsets (a fast tokenizer's offset mapping), so a step text
    that happens to contain the tag string is not mistaken for a boundary; a tag that the tokenizer merges
    with its neighbours raises. Returns NaN past a sample's last step. ``num_steps`` fixes S.
    """

    name = "prm"

    def __init__(self, *, model: Any, tokenizer: Any = None, name: str = "prm", kind: str = "causal_lm",
                 step_tag: str = "ки", tag_prefix: str = " ", step_separator: str = "\n", prompt_separator: str = " ",
                 good_token: str = "+", bad_token: str = "-", positive_label: int = 1, batch_size: int = 8,
                 device: str = "cpu", dtype: str = "float32", num_steps: Optional[int] = None,
                 max_length: Optional[int] = None):
        if kind not in ("causal_lm", "token_classification"):
            raise ValueError(f"prm: kind={kind!r} is not valid; valid: 'causal_lm', 'token_classification'")
        if batch_size < 1:
            raise ValueError(f"prm: batch_size must be >= 1; got {batch_size}")
        auto = "AutoModelForCausalLM" if kind == "causal_lm" else "AutoModelForTokenClassification"
        self.model, self.tokenizer = _load_lm(model, tokenizer, auto, device, dtype, "prm")
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("prm: needs a fast tokenizer (offset mappings) to locate the step tags")
        self.name, self.kind, self.device, self.batch_size, self.num_steps = name, kind, device, batch_size, num_steps
        self.step_tag, self.tag_prefix, self.step_separator, self.prompt_separator = step_tag, tag_prefix, step_separator, prompt_separator
        self.step_tag_id = self._single_id(step_tag, "step_tag")
        if kind == "causal_lm":
            self.good_id, self.bad_id = self._single_id(good_token, "good_token"), self._single_id(bad_token, "bad_token")
        else:
            n = int(getattr(self.model.config, "num_labels", 2))
            if n > 1 and not 0 <= positive_label < n:
                raise ValueError(f"prm: positive_label={positive_label} is not a label of a {n}-label head")
        self.positive_label = positive_label
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)

    def _single_id(self, text: str, what: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"prm: {what} {text!r} must be one token of the PRM's tokenizer; it is {len(ids)} tokens {ids}")
        return int(ids[0])

    def build(self, prompt: str, steps: Sequence[str]) -> tuple[str, list[int]]:
        """(the PRM's input text, the character offset where each step's tag starts)."""
        text = prompt + self.prompt_separator
        starts = []
        for k, s in enumerate(steps):
            if k:
                text += self.step_separator
            text += s + self.tag_prefix
            starts.append(len(text))
            text += self.step_tag
        return text, starts

    def encode(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """(token ids, the token position of each step's tag)."""
        text, starts = self.build(prompt, steps)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        pos = []
        at = {a: i for i, (a, b) in enumerate(offsets) if b > a}  # char start -> token index
        for k, c in enumerate(starts):
            i = at.get(c)
            if i is None or ids[i] != self.step_tag_id or offsets[i][1] != c + len(self.step_tag):
                raise ValueError(f"prm: the step tag {self.step_tag!r} after step {k} was merged with neighbouring text "
                                 f"by the tokenizer; change tag_prefix/step_separator")
            pos.append(i)
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"prm: input of {len(ids)} tokens exceeds max_length={self.max_length}")
        return list(ids), pos

    def _scores_at(self, logits: Tensor) -> Tensor:
        """Scores from logits at tag positions: [N, V or labels] -> [N]."""
        logits = logits.float()
        if self.kind == "causal_lm":
            return torch.softmax(logits[:, [self.good_id, self.bad_id]], dim=-1)[:, 0]
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, self.positive_label]

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], meta: Meta = None) -> Tensor:
        prompts = _check_texts(prompts, "prompts")
        if len(prompts) != len(steps):
            raise ValueError(f"prm: {len(prompts)} prompts but {len(steps)} step lists")
        for i, st in enumerate(steps):
            if isinstance(st, str) or not all(isinstance(x, str) for x in st):
                raise TypeError(f"prm: steps[{i}] must be a list of step strings")
        S = max((len(st) for st in steps), default=0) if self.num_steps is None else int(self.num_steps)
        if any(len(st) > S for st in steps):
            raise ValueError(f"prm: a sample has more than num_steps={S} steps")
        out = torch.full((len(prompts), S), float("nan"))
        enc = [self.encode(p, st) if len(st) else None for p, st in zip(prompts, steps)]
        todo = [i for i, e in enumerate(enc) if e is not None]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(todo), self.batch_size):
            rows = todo[s: s + self.batch_size]
            ids, att = _pad_right([enc[i][0] for i in rows], pad, self.device)
            logits = self.model(input_ids=ids, attention_mask=att).logits  # [b, L, V or labels]
            r = torch.tensor([j for j, i in enumerate(rows) for _ in enc[i][1]], device=ids.device)
            p = torch.tensor([q for i in rows for q in enc[i][1]], device=ids.device)
            k = torch.tensor([kk for i in rows for kk in range(len(enc[i][1]))])
            vals = self._scores_at(logits[r, p]).cpu()
            out[torch.tensor(rows)[r.cpu()], k] = vals
        return out
