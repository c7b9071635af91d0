"""AC-Flow's sample weights against a loop written from the formula, and its options on a tiny run."""
import math

import pytest
import torch

from flowrl.train.critic import advantage_weights


def reference_weights(a, valid, weighting, tau):
    """w_b = e_b / mean_{valid} e, e_b = exp(a_b / tau) or max(a_b, 0); 0 where invalid; one sample at a time."""
    e = []
    for ab, vb in zip(a.tolist(), valid.tolist()):
        if not vb:
            e.append(0.0)
        elif weighting == "exp":
            e.append(math.exp(ab / tau))
        else:
            e.append(max(ab, 0.0))
    n = sum(valid.tolist())
    mean = sum(e) / max(n, 1)
    return torch.tensor([x / max(mean, 1e-12) for x in e])


@pytest.mark.parametrize("weighting", ["exp", "positive"])
def test_weights_match_the_formula_with_invalid_samples(gen, weighting):
    a = torch.randn(37, generator=gen) * 1.5
    valid = torch.rand(37, generator=gen) > 0.3
    got = advantage_weights(a, valid, weighting=weighting, temperature=0.5)
    torch.testing.assert_close(got, reference_weights(a, valid, weighting, 0.5), rtol=1e-5, atol=1e-6)
    assert float(got[valid].mean()) == pytest.approx(1.0, rel=1e-5)
    assert bool((got[~valid] == 0).all())


def test_hand_worked_and_degenerate_cases():
    a, ok = torch.tensor([1.0, -1.0, 3.0, 0.0]), torch.tensor([True, True, True, False])
    # positive: e = [1, 0, 3, 0], mean over the 3 valid = 4/3 -> w = [0.75, 0, 2.25, 0]
    torch.testing.assert_close(advantage_weights(a, ok, weighting="positive"), torch.tensor([0.75, 0.0, 2.25, 0.0]))
    # exp, tau 1: e = [e, 1/e, e^3], w = e_b / mean
    e = torch.tensor([math.e, 1 / math.e, math.e ** 3])
    torch.testing.assert_close(advantage_weights(a, ok, weighting="exp")[:3], e / e.mean())
    # all-equal group (A = 0 everywhere): exp gives uniform weights, positive gives none (only W2 acts)
    z = torch.zeros(5)
    torch.testing.assert_close(advantage_weights(z, z == 0, weighting="exp"), torch.ones(5))
    torch.testing.assert_close(advantage_weights(z, z == 0, weighting="positive"), torch.zeros(5))
    # a single valid sample with A > 0 carries the whole batch's mean
    torch.testing.assert_close(advantage_weights(torch.tensor([2.0]), torch.tensor([True]), weighting="positive"),
                               torch.tensor([1.0]))
    # the reduce hook sees (sum e, n_valid): doubling both leaves the weights as they are
    torch.testing.assert_close(advantage_weights(a, ok, weighting="positive", reduce=lambda t: 2 * t),
                               torch.tensor([0.75, 0.0, 2.25, 0.0]))


def test_bad_input_is_named():
    a, ok = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="weighting 'softmax' is unknown; valid"):
        advantage_weights(a, ok, weighting="softmax")
    with pytest.raises(ValueError, match="valid bool"):
        advantage_weights(a, torch.ones(3), weighting="exp")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        advantage_weights(a, ok, weighting="exp", temperature=0.0)


def test_positive_weighting_run_with_several_passes(tmp_path):
    from flowrl.config import load
    from flowrl.pipelines.tiny import build_tiny_sd3
    from flowrl.train.config import TrainConfig
    from flowrl.train.loop import train
    from flowrl.train.metrics_log import read_metrics

    model = build_tiny_sd3(tmp_path / "sd3")
    base = ["flow.model=sd3", f"flow.model_path={model}", "flow.prompts=[a red cube, a blue ball]",
            "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "iterations=2", "prompts_per_iter=2",
            "group_size=4", "flow.num_steps=3", "eval.every=2", "eval.num_per_prompt=2", "eval.grid_per_prompt=1",
            "progress=false", "trackers=[]", "algorithm=ac_flow", "flow.critic.warmup_iters=1",
            "flow.critic.width=8", "flow.critic.weighting=positive", "updates_per_rollout=2", "minibatches=2"]
    train(load(TrainConfig, None, base), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 < r["critic/weight_pos_frac"] < 1.0  # group-normalised A: some steps above, some below
        assert math.isfinite(r["acflow/fm"]) and math.isfinite(r["acflow/w2"])
    with pytest.raises(ValueError, match=r"fm_sigma"):  # the noise levels are now the trained steps' own
        load(TrainConfig, None, base + ["flow.critic.fm_sigma=[0.2, 0.9]"])


def test_the_critic_starts_from_the_run_seed_whatever_the_global_generator():
    """The critic's initial weights come from cfg.seed alone (every rank and every run start alike), not from the
    global generator, which other code draws from and torch may seed differently in each process."""
    from flowrl.config import load
    from flowrl.train.algorithms import ALGORITHMS
    from flowrl.train.config import TrainConfig

    x, sigma, cond = torch.randn(3, 1, 8, 8), torch.rand(3), {"pooled_prompt_embeds": torch.randn(3, 4)}

    def initial_weights(global_seed: int, seed: int = 0) -> dict:
        cfg = load(TrainConfig, None, ["algorithm=ac_flow", "flow.critic.width=8", f"seed={seed}"])
        torch.manual_seed(global_seed)
        algo = ALGORITHMS["ac_flow"](cfg)
        algo._build_critic(x, sigma, cond, "cpu")
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the global generator was not advanced
        return algo.critic.state_dict()

    a, b, c = initial_weights(1), initial_weights(2), initial_weights(1, seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
