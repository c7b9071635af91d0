"""AC-Flow's per-step credit: A[b, k] = clip(G_b - V(x_{b,k}, sigma_k)) from the critic before this iteration's fit,
and a flow-matching loss whose every trained step is weighted by its own A, against hand-worked numbers and loops."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flowrl.train.algorithms.ac_flow import ACFlow, weighted_flow_matching

# G float [4] and a critic table V[b, k] over K = 4 states; sample 3 is invalid (masked out)
G = torch.tensor([1.0, -0.5, 2.0, 0.3])
TABLE = torch.tensor([[0.2, 0.5, 0.9, 1.0],
                      [0.0, -0.2, -1.0, -0.5],
                      [-1.0, 0.5, 1.5, 2.5],
                      [9.0, 9.0, 9.0, 9.0]])
STEPS = torch.tensor([0, 2, 3])  # the trained steps (a subset, as with an SDE window)
# A[b, t] = clip(G_b - TABLE[b, STEPS[t]], -1, 1), worked by hand:
#   b0: 1 - 0.2, 1 - 0.9, 1 - 1.0         = 0.8, 0.1, 0.0
#   b1: -0.5 - 0, -0.5 + 1.0, -0.5 + 0.5  = -0.5, 0.5, 0.0
#   b2: 2 + 1 (clipped), 2 - 1.5, 2 - 2.5 = 1.0, 0.5, -0.5
A_HAND = torch.tensor([[0.8, 0.1, 0.0], [-0.5, 0.5, 0.0], [1.0, 0.5, -0.5]])


class TableCritic(nn.Module):
    """V(x, sigma, c) = scale * TABLE[b, k], reading (b, k) from the state's first element (b * K + k); ``scale``
    (1 at first) is the one trainable parameter, so a fit changes V in a way the weights' normalisation cannot
    cancel."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, sigma, cond):
        idx = x.flatten(1)[:, 0].round().long()
        return self.scale * TABLE.flatten()[idx]


def setup(weighting="exp", warmup=0, lr=0.5):
    from flowrl.config import load
    from flowrl.train.config import TrainConfig

    cfg = load(TrainConfig, None, ["algorithm=ac_flow", "flow.critic.adv_clip=1.0", "flow.critic.temperature=1.0",
                                   f"flow.critic.weighting={weighting}", f"flow.critic.warmup_iters={warmup}",
                                   "flow.critic.updates_per_iter=3"])
    algo = ACFlow(cfg)
    algo.critic = TableCritic()
    algo.critic_opt = torch.optim.SGD(algo.critic.parameters(), lr=lr)
    B, K = TABLE.shape
    latents = torch.zeros(B, K + 1, 1, 2, 2)
    latents[:, :K] = (torch.arange(B)[:, None] * K + torch.arange(K)[None]).float()[..., None, None, None]
    traj = SimpleNamespace(latents=latents, sigmas=torch.linspace(1, 0, K + 1), num_steps=K, batch_size=B,
                           cond={"pooled_prompt_embeds": torch.randn(B, 3)})
    valid = torch.tensor([True, True, True, False])
    batch = SimpleNamespace(valid=valid, mask=valid[:, None].expand(B, len(STEPS)).clone())
    rollout = SimpleNamespace(side={"traj": traj, "steps": STEPS})
    adv = G[:, None].expand(B, len(STEPS)).clone()
    return algo, SimpleNamespace(world=1, rank=0), rollout, batch, adv


def exp_weights(a):
    """w = exp(A) / mean over the 9 valid (b, t) of exp(A), rows of the valid samples only."""
    e = a.exp()
    return e / e.mean()


def test_per_step_advantages_of_a_hand_worked_batch():
    algo, task, rollout, batch, adv = setup("exp")
    w, metrics = algo.prepare_update(task, rollout, batch, adv, it=0)
    assert w.shape == (4, 3)
    torch.testing.assert_close(w[:3], exp_weights(A_HAND))
    assert bool((w[3] == 0).all())  # the invalid sample
    assert metrics["critic/adv_mean"] == pytest.approx(float(A_HAND.mean()))
    # positive weighting: max(A, 0) / mean over the valid steps, by hand: sum = 2.9 over 9 steps
    algo, task, rollout, batch, adv = setup("positive")
    w, metrics = algo.prepare_update(task, rollout, batch, adv, it=0)
    torch.testing.assert_close(w[:3], A_HAND.clamp_min(0) * 9 / 2.9)
    assert metrics["critic/weight_pos_frac"] == pytest.approx(5 / 9)
    # during the warm-up the actor uses G itself at every step
    algo, task, rollout, batch, adv = setup("exp", warmup=1)
    w, _ = algo.prepare_update(task, rollout, batch, adv, it=0)
    torch.testing.assert_close(w[:3], exp_weights(G[:3, None].expand(3, 3)))


def test_the_advantage_comes_from_the_critic_before_its_fit():
    algo, task, rollout, batch, adv = setup("exp")
    w, _ = algo.prepare_update(task, rollout, batch, adv, it=0)
    scale = float(algo.critic.scale.detach())
    assert abs(scale - 1.0) > 0.05  # the fit moved V ...
    post = (G[:3, None] - scale * TABLE[:3][:, STEPS]).clamp(-1, 1)
    assert float((exp_weights(post) - exp_weights(A_HAND)).abs().max()) > 0.05  # ... enough to tell the two apart
    torch.testing.assert_close(w[:3], exp_weights(A_HAND))  # ... and the weights are the pre-fit critic's


@torch.no_grad()
def loop_loss(velocity, ref_velocity, x0, cond, sig, eps, w, mask, alpha):
    """The weighted flow-matching loss one point at a time, from the formula."""
    total, count = 0.0, 0
    b, T, n = eps.shape[:3]
    for i in range(b):
        for t in range(T):
            if not mask[i, t]:
                continue
            for j in range(n):
                x = (1 - sig[t]) * x0[i] + sig[t] * eps[i, t, j]
                c = {k: v[i:i + 1] for k, v in cond.items()}
                v = velocity(x[None], sig[t:t + 1], c)[0]
                v_ref = ref_velocity(x[None], sig[t:t + 1], c)[0]
                fm = float(((v - (eps[i, t, j] - x0[i])) ** 2).mean())
                total += float(w[i, t]) * fm + alpha * float(((v - v_ref) ** 2).mean())
                count += 1
    return total / count


def test_the_loss_weights_each_step_by_its_own_advantage(gen):
    b, T, n = 3, 4, 2
    x0 = torch.randn(b, 1, 2, 3, generator=gen)
    eps = torch.randn(b, T, n, 1, 2, 3, generator=gen)
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25])
    w = torch.rand(b, T, generator=gen) * 3  # distinct per step
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[1, 2] = False
    cond = {"pooled_prompt_embeds": torch.randn(b, 5, generator=gen)}
    a = nn.Parameter(torch.tensor(0.7))

    def velocity(x, s, c):  # depends on x, sigma and the condition, so every mix-up shows
        return a * x + s.view(-1, 1, 1, 1) * c["pooled_prompt_embeds"].sum(1).view(-1, 1, 1, 1)

    def ref_velocity(x, s, c):
        return 0.5 * x - s.view(-1, 1, 1, 1)

    loss, fm, w2 = weighted_flow_matching(velocity, ref_velocity, x0, cond, sig, eps, w, mask, 0.3)
    assert float(loss.detach()) == pytest.approx(loop_loss(velocity, ref_velocity, x0, cond, sig, eps, w, mask, 0.3), rel=1e-5)
    loss.backward()
    assert a.grad is not None and float(a.grad) != 0.0
    # one weight per sample (its steps' mean) is not the same loss: the test sees per-step weighting
    flat = w.mean(dim=1, keepdim=True).expand(b, T)
    assert abs(loop_loss(velocity, ref_velocity, x0, cond, sig, eps, flat, mask, 0.3) - float(loss.detach())) > 1e-3


def test_backward_trains_each_step_at_its_own_sigma():
    algo, task, rollout, batch, adv = setup("exp")
    w, _ = algo.prepare_update(task, rollout, batch, adv, it=0)
    seen = []
    weight = nn.Parameter(torch.tensor(1.0))

    class Pipe:
        dtype = torch.float32

        def velocity(self, x, s, c, cfg_scale=None):
            seen.append(s.clone())
            return weight * x

    @contextlib.contextmanager
    def reference():
        yield SimpleNamespace(velocity=lambda x, s, c, cfg_scale=None: 0 * x)

    task = SimpleNamespace(pipe=Pipe(), reference=reference, rank=0, acc=SimpleNamespace(backward=lambda l: l.backward()))
    index = torch.tensor([0, 2])
    mb = SimpleNamespace(mask=batch.mask[index])
    m = algo.backward(task, rollout, index, mb, w[index], it=0)
    sig = rollout.side["traj"].sigmas[STEPS]  # 1, 0.5, 0.25
    n = algo.cfg.flow.critic.fm_samples
    torch.testing.assert_close(seen[0], sig[None, :, None].expand(2, 3, n).reshape(-1))
    assert weight.grad is not None and m["acflow/loss"] > 0
