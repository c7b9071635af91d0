"""The flow-side methods that keep diversity: each formula against a hand-worked group and a slow loop reference on
random ragged groups, invariance to the order of the samples, a group of one; the sample selectors (DRIFT's
reward-concentrated subset); the noise-level KL weights; the config errors; and the pieces wired into a digits
rollout (bonus parts, kept samples out of the loss and the group statistics)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.core.diversity_bonus import diversity_bonus
from flowrl.core.sample_subset import select_samples
from flowrl.flow.kl_weights import kl_step_weights

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits/flow_grpo.yaml"


def _z(n):
    return torch.zeros(n, dtype=torch.long)


def _ragged(seed, D=3):
    """Random features in ragged groups (sizes 1, 2, 3, 5, 7, non-contiguous ids, rows interleaved)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [5, 1, 7, 2, 3]
    group = torch.cat([torch.full((n,), 10 * i + 3) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(group), generator=g)
    group = group[perm]
    feats = torch.randn(len(group), D, generator=g, dtype=torch.float64)
    return feats, group


# ---------------------------------------------------------------------------------------------- pairwise

def _pairwise_loops(f, group, normalize):
    f, group = f.tolist(), group.tolist()
    B = len(f)
    D = []
    for i in range(B):
        ds = [math.dist(f[i], f[j]) for j in range(B) if j != i and group[j] == group[i]]
        D.append(sum(ds) / len(ds) if ds else 0.0)
    out = []
    for i in range(B):
        if normalize == "group":
            mates = [D[j] for j in range(B) if group[j] == group[i]]
            out.append(D[i] / (sum(mates) / len(mates) + 1e-8))
        else:
            out.append(D[i] / (sum(D) / B + 1e-8))
    return torch.tensor(out, dtype=torch.float64)


def test_pairwise_line_and_loops():
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    # D = [6, 4, 4, 6] / 3, group mean 5/3: b = [1.2, 0.8, 0.8, 1.2]
    b = diversity_bonus("pairwise", f, _z(4), torch.zeros(4))
    assert torch.allclose(b, torch.tensor([1.2, 0.8, 0.8, 1.2]), atol=1e-6)
    for seed, norm in itertools.product(range(3), ("group", "batch")):
        f, g = _ragged(seed)
        got = diversity_bonus("pairwise", f, g, torch.zeros(len(g)), normalize=norm).double()
        assert torch.allclose(got, _pairwise_loops(f, g, norm), atol=1e-6)


def test_pairwise_reward_gate():
    # the same line, rewards [1, 0.5, 0, 1]: b = r * [1.2, 0.8, 0.8, 1.2] (a poor sample earns nothing for being far)
    f, r = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([1.0, 0.5, 0.0, 1.0])
    b = diversity_bonus("pairwise", f, _z(4), r, reward_gate=True)
    assert torch.allclose(b, torch.tensor([1.2, 0.4, 0.0, 1.2]), atol=1e-6)
    f, g = _ragged(0)
    r = torch.rand(len(g), generator=torch.Generator().manual_seed(0))
    got = diversity_bonus("pairwise", f, g, r, reward_gate=True).double()
    assert torch.allclose(got, r.double() * _pairwise_loops(f, g, "group"), atol=1e-6)


def test_digits_reward_saturates():
    from flowrl.rewards import build_reward

    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = [f"a handwritten digit {d}" for d in range(6)]
    p = build_reward("digits")(x, prompts)["digits"]
    s = build_reward("digits", saturate_at=0.5)(x, prompts)["digits"]
    assert torch.allclose(s, (p / 0.5).clamp_max(1.0)) and bool((p < 0.5).any())
    with pytest.raises(ValueError, match="saturate_at"):
        build_reward("digits", saturate_at=1.5)


# ---------------------------------------------------------------------------------------------- cluster_size

def test_cluster_size_hand_worked():
    # two tight clusters of 3 and 1: |C| = 3, 3, 3, 1; raw n/|C| = 4/3 and 4; group-normalised 1/|C| / mean(1/|C|)
    f = torch.tensor([[0.0], [0.01], [0.02], [5.0]])
    b = diversity_bonus("cluster_size", f, _z(4), torch.zeros(4))
    assert torch.allclose(b, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]), atol=1e-6)
    raw = diversity_bonus("cluster_size", f, _z(4), torch.zeros(4), normalize="none")
    assert torch.allclose(raw, torch.tensor([4 / 3, 4 / 3, 4 / 3, 4.0]), atol=1e-6)
    sq = diversity_bonus("cluster_size", f, _z(4), torch.zeros(4), normalize="none", alpha=2.0)
    assert torch.allclose(sq, torch.tensor([16 / 9, 16 / 9, 16 / 9, 16.0]), atol=1e-5)
    # three blobs of 2, 3, 1 with a fixed k = 3: n/|C| = 3, 2, 6
    f3 = torch.tensor([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [5, 5.1], [-6, 6]])
    b3 = diversity_bonus("cluster_size", f3, _z(6), torch.zeros(6), k=3, normalize="none")
    assert torch.allclose(b3, torch.tensor([3.0, 3, 2, 2, 2, 6]), atol=1e-6)


def test_cluster_size_degenerate_groups():
    z = torch.zeros(5)
    # identical samples and equidistant ones are one cluster (any split would be arbitrary), also with k fixed
    assert torch.equal(diversity_bonus("cluster_size", torch.ones(5, 3), _z(5), z), torch.ones(5))
    assert torch.equal(diversity_bonus("cluster_size", torch.ones(5, 3), _z(5), z, k=3), torch.ones(5))
    assert torch.allclose(diversity_bonus("cluster_size", torch.eye(4), _z(4), z[:4]), torch.ones(4))
    # a group of one, and a group of two (the eigengap needs three samples to split)
    assert torch.equal(diversity_bonus("cluster_size", torch.randn(1, 3), _z(1), z[:1]), torch.ones(1))
    assert torch.equal(diversity_bonus("cluster_size", torch.tensor([[0.0], [9.0]]), _z(2), z[:2]), torch.ones(2))
    # four copies and one outlier: the outlier alone
    f = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]])
    assert torch.allclose(diversity_bonus("cluster_size", f, _z(5), z, normalize="none"),
                          torch.tensor([1.25, 1.25, 1.25, 1.25, 5.0]))


def _cluster_loops(f, group, k=0, min_k=2, iters=20):
    """Per group, with numpy: the same spectral clustering as the batched code, written plainly."""
    f, group = f.double().numpy(), group.numpy()
    size = np.zeros(len(group))
    for gid in np.unique(group):
        idx = np.nonzero(group == gid)[0]
        X = f[idx]
        n = len(idx)
        d = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
        off = sorted(d[i, j] for i in range(n) for j in range(n) if i != j)
        h = off[(len(off) - 1) // 2] if off else 1.0
        A = np.exp(-d ** 2 / (2 * max(h, 1e-12) ** 2))
        deg = A.sum(1)
        L = np.eye(n) - A / np.sqrt(deg[:, None] * deg[None, :])
        lam, U = np.linalg.eigh(L)
        if k:
            kg = min(k, n)
        else:
            cands = [(lam[j] - lam[j - 1], j) for j in range(min_k, n)]  # k = j clusters, gap lambda_{j+1}-lambda_j
            kg = 1
            if cands and max(c[0] for c in cands) > 1e-9:
                best = max(c[0] for c in cands)
                kg = next(j for gap, j in cands if gap == best)
        if d.max() == 0:
            kg = 1
        E = U[:, :kg]
        E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
        far = ((E - E.mean(0)) ** 2).sum(1)
        centres = [int(np.argmax(far))]
        nearest = ((E - E[centres[0]]) ** 2).sum(1)
        for _ in range(1, kg):
            c = int(np.argmax(nearest))
            centres.append(c)
            nearest = np.minimum(nearest, ((E - E[c]) ** 2).sum(1))
        C = E[centres].copy()
        for _ in range(iters):
            assign = np.array([np.argmin([((e - c) ** 2).sum() for c in C]) for e in E])
            for c in range(kg):
                if (assign == c).any():
                    C[c] = E[assign == c].mean(0)
        assign = np.array([np.argmin([((e - c) ** 2).sum() for c in C]) for e in E])
        for a, i in zip(assign, idx):
            size[i] = (assign == a).sum()
    return torch.tensor(size)


@pytest.mark.parametrize("seed", range(4))
def test_cluster_size_against_loops(seed):
    f, g = _ragged(seed)
    ng = torch.tensor([(g == x).sum().item() for x in g.tolist()], dtype=torch.float64)
    for k in (0, 2):
        got = diversity_bonus("cluster_size", f, g, torch.zeros(len(g)), k=k, normalize="none").double()
        assert torch.allclose(got, ng / _cluster_loops(f, g, k=k), atol=1e-9), (seed, k)


# ---------------------------------------------------------------------------------------------- drift_potential

def test_drift_potential_line():
    # 0, 1, 2, 3: Phi(S) = 20/12 = 5/3; Phi(S \ {0}) = mean(1, 2, 1) = 4/3, Phi(S \ {1}) = mean(2, 3, 1) = 2
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    raw = diversity_bonus("drift_potential", f, _z(4), torch.zeros(4), normalize="none")
    assert torch.allclose(raw, torch.tensor([1 / 3, -1 / 3, -1 / 3, 1 / 3]), atol=1e-6)
    assert torch.allclose(diversity_bonus("drift_potential", f, _z(4), torch.zeros(4)),
                          torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-6)
    # gamma adds (gamma - 1) Phi(S) to every sample of the group: 0.5 * 5/3
    g2 = diversity_bonus("drift_potential", f, _z(4), torch.zeros(4), normalize="none", gamma=1.5)
    assert torch.allclose(g2, raw + 5 / 6, atol=1e-6)
    # logdet, two samples: K = [[1, k], [k, 1]] + r I, F_i = log det - log(1 + r)
    f2 = torch.tensor([[0.0], [1.0]])  # median distance 1: k = exp(-1/2)
    kk, r = math.exp(-0.5), 0.01
    want = math.log((1 + r) ** 2 - kk ** 2) - math.log(1 + r)
    got = diversity_bonus("drift_potential", f2, _z(2), torch.zeros(2), potential="logdet", normalize="none")
    assert torch.allclose(got, torch.tensor([want, want]), atol=1e-6)


def _drift_loops(f, group, potential, ridge=1e-2):
    f, group = f.double(), group.tolist()
    out = []

    def phi(rows):
        if potential == "mean_distance":
            ds = [torch.dist(f[i], f[j]).item() for i in rows for j in rows if i != j]
            return sum(ds) / len(ds) if ds else 0.0
        K = torch.tensor([[math.exp(-torch.dist(f[i], f[j]).item() ** 2 / (2 * h * h)) for j in rows] for i in rows],
                         dtype=torch.float64)
        return torch.logdet(K + ridge * torch.eye(len(rows), dtype=torch.float64)).item() if rows else 0.0

    for i in range(len(group)):
        S = [j for j in range(len(group)) if group[j] == group[i]]
        off = sorted(torch.dist(f[a], f[b]).item() for a in S for b in S if a != b)
        h = max(off[(len(off) - 1) // 2], 1e-12) if off else 1.0
        out.append(phi(S) - phi([j for j in S if j != i]) if len(S) > 1 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("potential", ["mean_distance", "logdet"])
def test_drift_potential_against_loops(potential):
    for seed in range(3):
        f, g = _ragged(seed)
        got = diversity_bonus("drift_potential", f, g, torch.zeros(len(g)), potential=potential, normalize="none")
        # mean_distance goes through pairwise_distances, which computes in float32
        assert torch.allclose(got.double(), _drift_loops(f, g, potential), atol=1e-6), seed
    # mean_distance with gamma = 1: the F of a group sum to 0 (groups of 3 or more)
    f, g = _ragged(7)
    F = diversity_bonus("drift_potential", f, g, torch.zeros(len(g)), normalize="none")
    for x in g.unique():
        if (g == x).sum() >= 3:
            assert abs(float(F[g == x].sum())) < 1e-6


@pytest.mark.parametrize("name,params", [("pairwise", {}), ("cluster_size", {}), ("cluster_size", {"k": 3}),
                                         ("drift_potential", {}), ("drift_potential", {"potential": "logdet"})])
def test_bonus_order_invariant_and_group_of_one(name, params):
    f, g = _ragged(11)
    b = diversity_bonus(name, f, g, torch.zeros(len(g)), **params)
    perm = torch.randperm(len(g), generator=torch.Generator().manual_seed(5))
    bp = diversity_bonus(name, f[perm], g[perm] * 7 + 1, torch.zeros(len(g)), **params)  # other ids, other order
    assert torch.allclose(bp, b[perm], atol=1e-9)
    single = diversity_bonus(name, f[:1], g[:1], torch.zeros(1), **params)
    assert single.shape == (1,) and torch.isfinite(single).all()
    assert float(single) == {"pairwise": 0.0, "cluster_size": 1.0, "drift_potential": 0.0}[name]


def test_bonus_parameter_errors_name_valid_values():
    f, g, r = torch.randn(4, 2), _z(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"normalize='x'; valid: \['group', 'none'\]"):
        diversity_bonus("cluster_size", f, g, r, normalize="x")
    with pytest.raises(ValueError, match=r"potential='vendi'; valid: \['mean_distance', 'logdet'\]"):
        diversity_bonus("drift_potential", f, g, r, potential="vendi")
    with pytest.raises(TypeError, match=r"unknown parameter.*'kk'.*valid: \['k', 'min_k', 'max_k'"):
        diversity_bonus("cluster_size", f, g, r, kk=2)


# ---------------------------------------------------------------------------------------------- sample selectors

def test_drift_subset_hand_worked():
    r = torch.tensor([0.1, 0.5, 0.52, 0.55, 0.9, 0.0, 1.0, 2.0, 3.0, 3.1])
    g = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    # group 0: windows of 3 sorted rewards have ranges .45, .05, .38 -> {0.5, 0.52, 0.55}, both outliers dropped
    # group 1: ranges 2, 2, 1.1 -> {2, 3, 3.1}
    want = torch.tensor([0, 1, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(select_samples("drift", r, g, keep=3), want)
    # equally tight windows: the higher one
    assert torch.equal(select_samples("drift", torch.tensor([0.0, 1.0, 2.0, 3.0]), _z(4), keep=2),
                       torch.tensor([False, False, True, True]))
    # invalid samples are never kept; a group with keep or fewer valid keeps them all
    v = torch.ones(10, dtype=torch.bool)
    v[2] = False
    assert torch.equal(select_samples("drift", r, g, keep=3, valid=v),
                       torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool))
    assert torch.equal(select_samples("drift", r, g, keep=5, valid=v), v)
    assert torch.equal(select_samples("top", r, g, keep=2), torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool))
    assert torch.equal(select_samples("drift", torch.tensor([0.3]), _z(1), keep=4), torch.tensor([True]))


def _drift_subset_loops(r, g, keep):
    out = torch.zeros(len(r), dtype=torch.bool)
    for x in g.unique().tolist():
        idx = sorted((i for i in range(len(r)) if g[i] == x), key=lambda i: float(r[i]))
        kk = min(keep, len(idx))
        spans = [(float(r[idx[s + kk - 1]] - r[idx[s]]), -s) for s in range(len(idx) - kk + 1)]
        s = -min(spans)[1]
        out[idx[s:s + kk]] = True
    return out


def test_drift_subset_against_loops_and_order():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        f, g = _ragged(int(torch.randint(100, (1,), generator=gen)))
        r = torch.randn(len(g), generator=gen)
        for keep in (1, 2, 4):
            got = select_samples("drift", r, g, keep=keep)
            assert torch.equal(got, _drift_subset_loops(r, g, keep)), keep
            perm = torch.randperm(len(g), generator=gen)
            assert torch.equal(select_samples("drift", r[perm], g[perm], keep=keep), got[perm])


# ---------------------------------------------------------------------------------------------- KL weights

def test_kl_weights_values():
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.equal(kl_step_weights("uniform", s), torch.ones(5))
    assert torch.allclose(kl_step_weights("sigma_power", s, power=2.0, scale=2.0, floor=0.1),
                          torch.tensor([2.1, 1.225, 0.6, 0.225, 0.1]))
    assert torch.equal(kl_step_weights("early_steps", s, threshold=0.5, early=3.0, late=0.5),
                       torch.tensor([3.0, 3.0, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="finite weights >= 0"):
        kl_step_weights("sigma_power", s, scale=-1.0)


# ---------------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("override,words", [
    ("flow.diversity_bonus=[{name: clusters}]", ["clusters", "cluster_size", "drift_potential", "pairwise"]),
    ("flow.diversity_bonus=[{name: cluster_size, params: {kk: 2}}]", ["kk", "min_k", "max_k"]),
    ("flow.diversity_bonus=[{name: pairwise, features: pixelz}]", ["pixelz", "pixels"]),
    ("flow.diversity_bonus=[{name: pairwise, wieght: 1}]", ["wieght", "name, weight, features, params"]),
    ("flow.kl_weight={name: sigma_powr}", ["sigma_powr", "early_steps", "sigma_power", "uniform"]),
    ("flow.kl_weight={name: sigma_power, powr: 2}", ["powr", "power", "scale", "floor"]),
    ("loss.kl_beta=0 --set flow.kl_weight={name: early_steps}", ["kl_beta", "uniform"]),
    ("flow.sample_subset={name: drift, keep: 17}", ["keep=17", "group_size=16"]),
    ("flow.sample_subset={name: drfit, keep: 8}", ["drfit", "drift", "top"]),
    ("flow.sample_subset={name: drift}", ["sample_subset", "keep"]),
    ("flow.sample_subset={name: drift, keep: 8, spread: 1}", ["spread", "keep"]),
])
def test_config_errors_name_the_valid_values(override, words):
    from flowrl.config import ConfigError, load
    from flowrl.train.config import TrainConfig

    with pytest.raises((ConfigError, ValueError, TypeError)) as e:
        load(TrainConfig, DIGITS, override.split(" --set "))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_drift_subset_with_a_bonus_warns_that_the_bonus_will_dominate():
    """DRIFT's subset keeps each group's tightest reward window, so a diversity bonus then decides most of the
    standardised advantage (on digits it wrecked the model); the combination warns, either piece alone does not."""
    import warnings

    from flowrl.config import load
    from flowrl.train.config import TrainConfig

    with pytest.warns(UserWarning, match="diversity bonus decides most of the advantage"):
        load(TrainConfig, DIGITS, ["flow.sample_subset={name: drift, keep: 8}",
                                   "flow.diversity_bonus=[{name: pairwise, weight: 0.5}]"])
    bonus = "flow.diversity_bonus=[{name: pairwise, weight: 0.5}]"
    for alone in (["flow.sample_subset={name: drift, keep: 8}"], [bonus],
                  ["flow.sample_subset={name: top, keep: 8}", bonus]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load(TrainConfig, DIGITS, alone)


# ---------------------------------------------------------------------------------------------- in a digits rollout

def test_digits_rollout_with_bonuses_and_subset():
    from accelerate import Accelerator

    from flowrl.config import load
    from flowrl.core import compute_advantages
    from flowrl.train.config import TrainConfig
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    with pytest.warns(UserWarning, match="decides most of the advantage"):  # the combination is the point here
        cfg = load(TrainConfig, DIGITS, [
            "prompts_per_iter=3", "group_size=6", "progress=false", "trackers=[]", "threads=1",
            "flow.diversity_bonus=[{name: cluster_size, weight: 0.5}, {name: drift_potential, weight: 0.25}, "
            "{name: pairwise, weight: 0.5}]",
            "flow.sample_subset={name: drift, keep: 4}"])
        task = FlowTask(cfg, Accelerator(cpu=True))
    roll = task.rollout(0, iteration_generator(0, 0, 0))
    b, m = roll.batch, roll.metrics
    keep = b.sample_valid
    assert keep.view(3, 6).sum(1).tolist() == [4, 4, 4] and m["subset/kept_frac"] == pytest.approx(4 / 6)
    for name in ("cluster_size", "drift_potential", "pairwise"):
        part = b.outcome_parts[f"diversity/{name}"]
        assert f"reward/diversity/{name}" in m
        assert torch.equal(part[~keep], torch.zeros(int((~keep).sum())))  # dropped: masked out, not compared
    # the bonuses compare the kept samples of a group only: pairwise recomputed on them
    f = roll.side["traj"].samples.float().flatten(1)
    g = torch.arange(3).repeat_interleave(6)
    want = diversity_bonus("pairwise", f[keep], g[keep], torch.zeros(int(keep.sum())))
    assert torch.allclose(b.outcome_parts["diversity/pairwise"][keep], want, atol=1e-6)
    # the subset is the reward-concentrated window of the task reward
    assert torch.equal(keep, select_samples("drift", b.outcome_parts["digits"], g, keep=4))
    adv = compute_advantages("grpo", b, scale="group")
    assert torch.equal(adv[~keep], torch.zeros_like(adv[~keep]))
    kept = b.outcome[keep].view(3, 4)  # group statistics of the kept samples: standardised advantages
    z = (kept - kept.mean(1, keepdim=True)) / (kept.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv[keep][:, 0].view(3, 4), z, atol=1e-3)


def test_docs_yaml_blocks_load():
    """Every YAML block of docs/diversity.md, laid over the digits config, is a valid config."""
    import json
    import re

    import yaml

    from flowrl.config import load
    from flowrl.train.config import TrainConfig

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs/diversity.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        over = []
        for k, v in yaml.safe_load(block).items():
            items = v.items() if k == "flow" else [(None, v)]
            over += [f"{k}.{k2}={json.dumps(v2)}" if k2 else f"{k}={json.dumps(v2)}" for k2, v2 in items]
        load(TrainConfig, DIGITS, over)
