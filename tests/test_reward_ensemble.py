"""The conservative reward ensemble (rewards/ensemble.py) and the Gaussian digits classifier that is its second
member on digits (pipelines/digits_gaussian.py, reward "digits_gaussian"): formulas against hand-worked values and
slow per-class references, errors, and the shipped diversity recipe's rewards table."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from flowrl.pipelines.digits import digit_prompts, digits_split
from flowrl.pipelines.digits_gaussian import fit_gaussian_classifier, load_digit_gaussian
from flowrl.rewards import REWARDS, build_reward, build_rewards, register_reward
from flowrl.rewards.base import RewardError
from flowrl.rewards.ensemble import reduce_ensemble

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "digits" / "flow_grpo_diverse.yaml"


def test_reductions_on_a_hand_worked_ensemble():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.6, 0.4, 0.5]])
    assert torch.allclose(reduce_ensemble(scores, "min"), torch.tensor([0.6, 0.2, 0.5]))
    assert torch.allclose(reduce_ensemble(scores, "mean"), torch.tensor([0.75, 0.3, 0.5]))
    # population variance: 0.15^2 = 0.0225, 0.1^2 = 0.01, 0; penalty 2
    assert torch.allclose(reduce_ensemble(scores, "uwo", penalty=2.0), torch.tensor([0.705, 0.28, 0.5]))
    nan = torch.tensor([[0.9, float("nan")], [0.1, 0.3]])
    for reduce in ("min", "mean", "uwo"):
        out = reduce_ensemble(nan, reduce)
        assert out[0] == out[0] and math.isnan(float(out[1])), reduce  # a member's NaN is never reduced away
    with pytest.raises(ValueError, match="reduce='max'"):
        reduce_ensemble(scores, "max")


@pytest.fixture
def two_members():
    @register_reward("test_ens_high")
    def high(samples, prompts, meta):
        return {"test_ens_high": torch.tensor([0.9, 0.2, 0.5]), "test_ens_high/extra": torch.tensor([1.0, 2.0, 3.0])}

    @register_reward("test_ens_low")
    def low(samples, prompts, meta):
        return torch.tensor([0.6, 0.4, float("nan")])

    yield
    REWARDS.unregister("test_ens_high")
    REWARDS.unregister("test_ens_low")


def test_ensemble_reward_parts_and_masking(two_members):
    x = torch.zeros(3, 1, 8, 8)
    masked = {"test_ens_high": {}, "low": {"type": "test_ens_low", "on_error": "mask"}}
    r = build_reward("ensemble", members=masked, name="cons", on_error="mask")
    parts = r(x, ["a", "b", "c"])
    assert torch.allclose(parts["cons"][:2], torch.tensor([0.6, 0.2])) and math.isnan(float(parts["cons"][2]))
    assert parts["cons/valid"].tolist() == [True, True, False]
    assert parts["cons/low/valid"].tolist() == [True, True, False]  # the member's own mask, passed on
    assert torch.allclose(parts["cons/test_ens_high"][:2], torch.tensor([0.9, 0.2]))
    assert torch.allclose(parts["cons/low"][:2], torch.tensor([0.6, 0.4]))  # a member's score under its own name
    assert torch.allclose(parts["cons/test_ens_high/extra"][:2], torch.tensor([1.0, 2.0]))
    with pytest.raises(RewardError, match="'ensemble' gave a non-finite score for samples \\[2\\]"):
        build_reward("ensemble", members=masked)(x, ["a", "b", "c"])  # the default policy: NaN is an error
    mean = build_reward("ensemble", members=masked, reduce="uwo", penalty=2.0, on_error="mask")(x, ["a", "b", "c"])["ensemble"]
    assert torch.allclose(mean[:2], torch.tensor([0.705, 0.28]))


def test_ensemble_reward_errors_name_the_problem(two_members):
    with pytest.raises(ValueError, match="at least two members"):
        build_reward("ensemble", members={"test_ens_high": {}})
    with pytest.raises(ValueError, match=r"members \['test_ens_low'\] have a 'weight'"):
        build_reward("ensemble", members={"test_ens_high": {}, "test_ens_low": {"weight": 2.0}})
    with pytest.raises(ValueError, match="reduce='median'"):
        build_reward("ensemble", members={"test_ens_high": {}, "test_ens_low": {}}, reduce="median")
    with pytest.raises(ValueError, match="penalty"):
        build_reward("ensemble", members={"test_ens_high": {}, "test_ens_low": {}}, reduce="uwo", penalty=-1)
    with pytest.raises(Exception, match="no_such_reward"):
        build_reward("ensemble", members={"test_ens_high": {}, "no_such_reward": {}})


# ---------------------------------------------------------------------------------------------- Gaussian classifier
def _slow_gaussian_log_likelihoods(train_x, train_y, test_x, rank, ridge):
    """log N(z; mu_d, S_d) per class with numpy/scipy, one class at a time: PCA by SVD of the centred data,
    np.cov per class (ddof 1) + ridge I. float [N_test, 10]."""
    X = train_x.reshape(len(train_x), -1).astype(np.float64)
    m = X.mean(0)
    _, _, vt = np.linalg.svd(X - m, full_matrices=False)
    P = vt[:rank].T
    Z = (X - m) @ P
    zt = (test_x.reshape(len(test_x), -1).astype(np.float64) - m) @ P
    out = np.zeros((len(test_x), 10))
    for d in range(10):
        zd = Z[train_y == d]
        cov = np.cov(zd, rowvar=False) + ridge * np.eye(rank)
        out[:, d] = multivariate_normal(mean=zd.mean(0), cov=cov).logpdf(zt)
    return out


def test_gaussian_classifier_against_a_slow_per_class_reference():
    x, y = digits_split("reward")
    xt, _ = digits_split("judge")
    xt = xt[:50]
    model = fit_gaussian_classifier(x, y, rank=12, ridge=0.1)
    fast = model((xt + 1) / 2).double().numpy()  # the model takes [0, 1] images, the split is in [-1, 1]
    slow = _slow_gaussian_log_likelihoods(x.numpy(), y.numpy(), xt.numpy(), rank=12, ridge=0.1)
    # equal up to one constant (the 2 pi term): compare differences to class 0, and the posteriors
    np.testing.assert_allclose(fast - fast[:, :1], slow - slow[:, :1], rtol=1e-4, atol=1e-3)
    post_slow = np.exp(slow - slow.max(1, keepdims=True))
    post_slow /= post_slow.sum(1, keepdims=True)
    np.testing.assert_allclose(torch.tensor(fast).softmax(-1).numpy(), post_slow, atol=1e-5)


def test_gaussian_classifier_reads_held_out_real_digits_and_rejects_bad_input():
    model = load_digit_gaussian()
    xj, yj = digits_split("judge")  # never used to fit it
    acc = float((model((xj + 1) / 2).argmax(-1) == yj).float().mean())
    assert acc > 0.95, acc  # measured 0.978 with the defaults (rank 20, ridge 0.05)
    with pytest.raises(ValueError, match=r"images must be float \[B, 1, 8, 8\]"):
        model(torch.zeros(2, 64))
    x, y = digits_split("reward")
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_gaussian_classifier(x[y != 3], y[y != 3])
    with pytest.raises(ValueError, match="rank"):
        fit_gaussian_classifier(x, y, rank=65)
    with pytest.raises(ValueError, match="ridge"):
        fit_gaussian_classifier(x, y, ridge=0.0)


def test_digits_gaussian_reward_is_the_posterior_of_the_asked_digit():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g)
    digits = torch.tensor([0, 1, 2, 7, 8, 9])
    parts = build_reward("digits_gaussian")(x, digit_prompts(digits))
    logits = load_digit_gaussian()(x)
    assert torch.allclose(parts["digits_gaussian"], logits.softmax(-1)[torch.arange(6), digits], atol=1e-6)
    assert torch.equal(parts["digits_gaussian/accuracy"], (logits.argmax(-1) == digits).float())
    sat = build_reward("digits_gaussian", saturate_at=0.5)(x, digit_prompts(digits))["digits_gaussian"]
    assert torch.allclose(sat, (parts["digits_gaussian"] / 0.5).clamp_max(1.0))


def test_the_diversity_recipes_reward_is_the_minimum_of_the_cnn_and_the_gaussian_reader():
    from flowrl.config import load
    from flowrl.train.config import TrainConfig

    cfg = load(TrainConfig, str(RECIPE))
    combined = build_rewards(cfg.flow.rewards)
    x, y = digits_split("judge")
    x, y = (x[:40] + 1) / 2, y[:40]
    x[20:] = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # half noise: the members disagree
    outcome, parts, valid, metrics = combined.score(x, digit_prompts(y))
    cnn = build_reward("digits")(x, digit_prompts(y))["digits"]
    gauss = build_reward("digits_gaussian")(x, digit_prompts(y))["digits_gaussian"]
    assert bool(valid.all())
    assert torch.allclose(outcome, torch.minimum(cnn, gauss), atol=1e-6)
    assert bool((cnn - gauss).abs().max() > 0.1)  # the check above would not notice a max, a mean or one member
    assert "reward/digits_conservative/digits" in metrics and "reward/digits_conservative/digits_gaussian" in metrics


def test_digits_pca_features_are_distances_in_real_digits_principal_subspace():
    from flowrl.rewards.features import build_features

    x, _ = digits_split("reward")
    X = x.flatten(1).double().numpy()
    m = X.mean(0)
    P = np.linalg.svd(X - m, full_matrices=False)[2][:20].T  # the top-20 principal directions, signs arbitrary
    imgs = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = (imgs.flatten(1).double().numpy() * 2 - 1 - m) @ P
    f = build_features("digits_pca")(imgs)
    assert f.shape == (12, 20)
    # distances do not depend on the directions' signs: compare them, not the coordinates
    np.testing.assert_allclose(torch.cdist(f.double(), f.double()).numpy(),
                               np.linalg.norm(ref[:, None] - ref[None], axis=-1), rtol=1e-4, atol=1e-4)
    speckle = imgs.clone()
    speckle[:, :, 0, 0] = 1.0 - speckle[:, :, 0, 0]  # a corner pixel real digits never use
    moved_px = (speckle - imgs).flatten(1).norm(dim=1)
    moved_pca = (build_features("digits_pca")(speckle) - f).norm(dim=1)
    assert bool((moved_pca < 0.5 * moved_px * 2).all())  # pixels in [-1, 1] double the [0, 1] move; the subspace damps it
    with pytest.raises(ValueError, match=r"digits_pca features need digits images"):
        build_features("digits_pca")(torch.zeros(2, 3, 8, 8))


def test_dry_run_checks_every_member_of_an_ensemble():
    from flowrl.config import load
    from flowrl.train.config import TrainConfig
    from flowrl.train.preflight import PreflightError, _reward_checks

    def check(members):
        cfg = load(TrainConfig, str(RECIPE),
                   [f"flow.rewards={{c: {{type: ensemble, members: {members}}}}}"])
        return _reward_checks(cfg)

    assert check("{digits: {}, digits_gaussian: {rank: 10}}") == ["flow.rewards.c", "flow.rewards.c.digits",
                                                                  "flow.rewards.c.digits_gaussian"]
    with pytest.raises(PreflightError, match=r"flow.rewards.c.digitz: unknown reward 'digitz'"):
        check("{digits: {}, digitz: {}}")
    with pytest.raises(PreflightError, match=r"flow.rewards.c.digits_gaussian: .*unknown parameter.*'rnk'"):
        check("{digits: {}, digits_gaussian: {rnk: 3}}")
    with pytest.raises(PreflightError, match=r"flow.rewards.c: ensemble: give at least two members"):
        check("{digits: {}}")
