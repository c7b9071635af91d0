"""Evaluation sampling of the flow task in chunks, shared out over the ranks, with the scores gathered.

The evaluation set is N = P x n rows (P evaluation prompts, n samples each; row r is prompt r // n). It is cut
into chunks of ``eval.batch_size`` rows (0: one chunk per rank, ceil(N / R) rows); chunk j is sampled by one
sampler call seeded ``eval.seed + j`` and scored by the run's rewards, and rank r takes chunks r, r + R, ...
The reward parts of every rank are gathered and the metrics computed once over all N rows, so every rank
returns the same metrics. One process with ``batch_size`` 0 (or >= N) is the single call
``sample(prompts, samples_per_prompt=n, seed=eval.seed)``, exactly what the task did before chunking existed.
With a batch size set, the samples depend on the chunks, not on the number of processes.

Every rank makes the same number of sampler calls (a rank short of chunks samples a spare one and drops it):
under DDP or FSDP a forward pass may be a collective, and unequal counts would hang the run.

Diversity (``eval.diversity_features``): each chunk's samples also go through a feature extractor of
``flowrl.rewards.features`` (the rows' features travel with the reward parts, with their row indices, and are
gathered with them), and :func:`diversity_metrics` measures, per evaluation prompt, the mean pairwise distance
and the Vendi score of its n samples, averaged over the prompts.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor


def eval_chunks(num_rows: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """[(start, stop)) row ranges of the chunks, in order: ``batch_size`` rows each (0: ceil(N / world))."""
    if num_rows < 1:
        raise ValueError(f"eval_chunks: the evaluation set is empty (num_rows={num_rows})")
    c = batch_size if batch_size > 0 else -(-num_rows // world)
    return [(a, min(a + c, num_rows)) for a in range(0, num_rows, c)]


def rank_chunks(chunks: Sequence[tuple[int, int]], rank: int, world: int) -> list[tuple[int, bool]]:
    """(chunk index, real) for each sampler call of ``rank``: chunks rank, rank + world, ...; every rank gets
    ceil(len(chunks) / world) calls, the missing ones a spare chunk (real = False) whose result is dropped."""
    calls = -(-len(chunks) // world)
    out = []
    for q in range(calls):
        j = q * world + rank
        out.append((j, True) if j < len(chunks) else (j % len(chunks), False))
    return out


def sample_chunks(sample_fn: Callable[..., Tensor], prompts: Sequence[str], n: int, seed: int, *, batch_size: int,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[int, list[str], Tensor, bool]]:
    """Yield (chunk index, prompts of its rows, samples, real) for this rank's sampler calls.

    ``sample_fn(prompts, samples_per_prompt=, seed=)`` is the sampler (``flowrl.flow.sampler.sample`` with the
    run's settings bound). One chunk on one process: the single call over ``prompts`` with n per prompt.
    """
    N = len(prompts) * n
    chunks = eval_chunks(N, batch_size, world)
    if len(chunks) == 1 and world == 1:
        yield 0, [p for p in prompts for _ in range(n)], sample_fn(list(prompts), samples_per_prompt=n, seed=seed), True
        return
    for j, real in rank_chunks(chunks, rank, world):
        a, b = chunks[j]
        rows = [prompts[r // n] for r in range(a, b)]
        yield j, rows, sample_fn(rows, samples_per_prompt=1, seed=seed + j), real


def cat_parts(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The per-sample reward parts of several chunks, concatenated per key."""
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def gather_parts(parts: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    """Every rank's rows of every part (rank 0's first), padding dropped; ``parts`` itself on one process."""
    if world <= 1:
        return parts
    from flowrl.core.groups import gather_rows

    keys = sorted(parts)
    gathered, present, _ = gather_rows(*(parts[k] for k in keys))
    return {k: g[present.to(g.device)] for k, g in zip(keys, gathered)}


def scored_eval_parts(sample_fn: Callable[..., Tensor], score_fn: Callable[[Tensor, list[str]], dict[str, Tensor]],
                      prompts: Sequence[str], n: int, seed: int, *, batch_size: int, rank: int, world: int,
                      keep: Optional[Callable[[Tensor, list[str], dict[str, Tensor]], Any]] = None,
                      features: Optional[Callable[[Tensor], Tensor]] = None) -> dict[str, Tensor]:
    """The reward parts of all N evaluation rows (gathered over ranks). ``score_fn(samples, prompts)`` gives one
    chunk's parts; ``keep(samples, prompts, parts)``, when given, sees every real chunk (the grid keeps images).
    ``features(samples) -> float [b, D]``, when given, adds the parts FEATURES_KEY (the rows' features) and
    ROW_KEY (their row indices in 0..N-1, long), which :func:`pop_diversity` takes out again."""
    mine, spare = [], None
    chunks = eval_chunks(len(prompts) * n, batch_size, world)
    for j, rows, samples, real in sample_chunks(sample_fn, prompts, n, seed, batch_size=batch_size, rank=rank,
                                                world=world):
        p = score_fn(samples, rows)
        if features is not None:
            f = features(samples).float()
            p = {**p, FEATURES_KEY: f, ROW_KEY: torch.arange(*chunks[j], device=f.device)}
        if real:
            mine.append(p)
            if keep is not None:
                keep(samples, rows, p)
        elif spare is None:
            spare = {k: v[:0] for k, v in p.items()}  # a rank with no real chunk still gathers the right dtypes
    return gather_parts(cat_parts(mine) if mine else spare, world)


# ---------------------------------------------------------------------------------------------- diversity
FEATURES_KEY = "flowrl:eval_features"
ROW_KEY = "flowrl:eval_row"


def eval_features(spec: Any) -> Optional[Callable[[Tensor], Tensor]]:
    """The feature extractor named by ``eval.diversity_features`` (a registered name, ``{name, ...options}``, or
    None: no diversity measured), built once; its Vendi kernel options come with it (:func:`vendi_options`)."""
    if spec is None:
        return None
    from flowrl.rewards.features import FEATURES, build_features

    name, opts = feature_spec(spec)
    try:
        FEATURES.check_params(name, opts)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"eval.diversity_features={spec!r}: {e}") from None
    return build_features(name, **opts)


def feature_spec(spec: Any) -> tuple[str, dict]:
    """(name, options) of a feature spec: a registered name or a mapping {name, ...options}."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"eval.diversity_features={spec!r}: must be a registered sample feature's name, "
                         "{name: ..., ...options}, or null (no diversity measured)")
    opts = dict(spec)
    return opts.pop("name"), opts


def vendi_options(spec: Any) -> dict:
    """The Vendi kernel of the features named by ``spec``: their registry entry's ``vendi`` meta (cosine when
    the entry names none)."""
    from flowrl.rewards.features import FEATURES

    return dict(FEATURES.meta(feature_spec(spec)[0]).get("vendi", {"kernel": "cosine"}))


def pop_diversity(parts: dict[str, Tensor], n: int, vendi: Optional[dict] = None) -> dict[str, float]:
    """Take the features out of the gathered ``parts`` (in place) and return :func:`diversity_metrics` of them
    ({} when the parts hold none)."""
    if FEATURES_KEY not in parts:
        return {}
    f, row = parts.pop(FEATURES_KEY), parts.pop(ROW_KEY)
    return diversity_metrics(f, row // n, vendi)


def diversity_metrics(features: Tensor, group: Tensor, vendi: Optional[dict] = None) -> dict[str, float]:
    """``diversity``: mean over prompts of the mean distance between the features of a prompt's samples (ordered
    pairs i != j); ``vendi``: mean over prompts of the Vendi score of its samples (``flowrl.core.diversity``,
    kernel options ``vendi``). features float [N, D], group long [N] (the prompt of each row). Prompts with one
    sample have no pair and count in neither mean; with no prompt of two samples, nothing is measured ({})."""
    from flowrl.core.diversity import group_mean_pairwise_distance, vendi_score

    per_prompt, _ = group_mean_pairwise_distance(features, group)
    has = ~per_prompt.isnan()
    if not bool(has.any()):
        return {}
    vs, _ = vendi_score(features, group, **(vendi or {}))
    return {"diversity": float(per_prompt[has].mean()), "vendi": float(vs[has].mean())}
