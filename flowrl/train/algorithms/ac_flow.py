"""AC-Flow: actor-critic flow fine-tuning with a critic-weighted flow-matching loss (likelihood-free).

A critic V(x_t, sigma_t, c) (:class:`flowrl.train.critic.FlowCritic`) regresses the group-normalised reward G
(normalised reward shaping: the advantage estimator's output, e.g. ``grpo``) on every noisy state of the
rollouts; after a warm-up, A = clip(G - V) sets a weight w = exp(A / tau) (ORW-CFM-W2, Fan et al., 2025) or
max(A, 0) (``flow.critic.weighting``), normalised to mean 1, that multiplies a conditional flow-matching loss on
the rollout's own samples, plus alpha * ||v - v_ref||^2 (the Wasserstein-2 bound toward the reference). No SDE
log-prob enters the update. Recipe: ``configs/digits/ac_flow.yaml``; the options are ``flow.critic``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flowrl.core import TrajectoryBatch, aggregate
from flowrl.flow.pipeline import cond_select
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm
from flowrl.train.critic import FlowCritic, advantage_weights, critic_inputs
from flowrl.train.task import Rollout, all_reduce_mean_grads, iteration_generator


CRITIC_INIT_SALT = 90001  # the critic's initial weights: a stream of their own


def _all_reduce_sum(t: Tensor) -> Tensor:
    torch.distributed.all_reduce(t)
    return t


@register_algorithm("ac_flow")
class ACFlow(FlowAlgorithm):
    """AC-Flow (see the module docstring). Keeps the critic (built at the first update, when its input shapes are
    known), its optimiser and a counter of the flow-matching noise streams of the current iteration."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.critic: Optional[FlowCritic] = None
        self.critic_opt: Optional[torch.optim.Optimizer] = None
        self._pending: Optional[dict] = None  # a checkpoint's critic state, applied once the lazy layers exist
        self._fm_calls = 0

    @classmethod
    def needs_reference(cls, cfg: Any) -> bool:
        return True  # the W2 term pulls toward the reference velocity

    def _build_critic(self, x: Tensor, sigma: Tensor, cond: dict, device) -> None:
        """The critic and its optimiser, initialised from the run's seed: built and its lazy layers materialised
        on the CPU under a seeded fork of the global generator, so every rank and every run (and the CPU and
        GPU) start from the same weights whatever else drew from the global generator."""
        one = torch.zeros(1, dtype=torch.long, device=x.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(iteration_generator(self.cfg.seed, 0, 0, salt=CRITIC_INIT_SALT).initial_seed())
            self.critic = FlowCritic(width=self.cfg.flow.critic.width)
            with torch.no_grad():
                self.critic(x[:1].cpu(), sigma[:1].cpu(), {k: v.cpu() for k, v in cond_select(cond, one).items()})
        self.critic.to(device)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.flow.critic.lr)

    # ------------------------------------------------------------------ critic step -> sample weights
    def prepare_update(self, task, rollout: Rollout, batch: TrajectoryBatch, adv: Tensor, it: int):
        """AC-Flow's critic step and the per-sample weights of the actor's flow-matching loss.

        G float [B] = the estimator's group-normalised reward (normalised reward shaping); the critic
        V(x_k, sigma_k, c) regresses G on every state k < K of the rollouts (``updates_per_iter`` Adam steps).
        A_b = mean_k clip(G_b - V(x_{b,k}), +-adv_clip), or A_b = G_b during the warm-up (it < warmup_iters:
        the actor does not use the critic). Weight (``weighting``):
          exp:      w_b = exp(A_b / tau)      (ORW-CFM-W2's exp(tau r) with tau -> 1 / tau)
          positive: w_b = max(A_b, 0)         (only samples that beat their expected return are fitted)
        then w_b /= mean over valid samples (global over ranks); invalid samples get 0. With ``positive``, a batch
        where no A_b > 0 (every group all-equal) gets w = 0: only the W2 term acts (``critic/weight_pos_frac``
        logs the share of samples fitted). Returns float [B, T] (w_b broadcast over the batch's actions, 0 off
        mask) and metrics.
        """
        cc, traj = self.cfg.flow.critic, rollout.side["traj"]
        valid = batch.valid
        G = adv[:, 0].detach()
        rows = torch.arange(traj.batch_size, device=G.device)
        x, sigma, cond, K = critic_inputs(traj, rows)
        target = G.repeat_interleave(K)
        w_valid = valid.repeat_interleave(K).float()
        if self.critic_opt is None:  # the first update: the critic's input shapes are known only now
            self._build_critic(x, sigma, cond, x.device)
            if self._pending is not None:  # resumed: the lazy layers exist only now
                self.critic.load_state_dict(self._pending["critic"])
                self.critic_opt.load_state_dict(self._pending["critic_opt"])
                self._pending = None
        for _ in range(cc.updates_per_iter):  # a few regression steps per iteration
            v = self.critic(x, sigma, cond)
            loss = ((v - target) ** 2 * w_valid).sum() / w_valid.sum().clamp_min(1)
            self.critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_mean_grads(self.critic, task.world)
            self.critic_opt.step()
        with torch.no_grad():
            v = self.critic(x, sigma, cond).view(-1, K)
            warm = it < cc.warmup_iters
            a = G if warm else (G[:, None] - v).clamp(-cc.adv_clip, cc.adv_clip).mean(dim=1)
            w = advantage_weights(a, valid, weighting=cc.weighting, temperature=cc.temperature,
                                  reduce=_all_reduce_sum if task.world > 1 else None)
            ev = 1 - ((G[:, None] - v)[valid].var() / G[valid].var().clamp_min(1e-8))
        self._fm_calls = 0  # FM noise draws of this iteration's updates: one fresh stream per backward call
        metrics = {"critic/loss": float(loss.detach()), "critic/explained_var": float(ev), "critic/warmup": float(warm),
                   "critic/weight_max": float(w.max()), "critic/weight_pos_frac": float((w > 0).float().mean())}
        return w[:, None].expand_as(adv).contiguous() * batch.mask, metrics

    # ------------------------------------------------------------------ actor: weighted flow matching
    def backward(self, task, rollout: Rollout, index: Tensor, batch: TrajectoryBatch, w: Tensor, it: int) -> dict:
        """Critic-weighted conditional flow matching with the W2 regulariser (AC-Flow; ORW-CFM-W2, Fan et al.).

        For each sample b of the minibatch (its rollout's final x0_b) and n = ``fm_samples`` draws
        sigma ~ U(fm_sigma[0], fm_sigma[1]), eps ~ N(0, I):  x = (1 - sigma) x0_b + sigma eps,
          L = token_mean_{b, n} [ w_b ||v_theta(x, sigma, c_b) - (eps - x0_b)||^2 + alpha ||v_theta - v_ref||^2 ]
        (squared norms averaged over the latent's elements; w float [b, T] from :meth:`prepare_update`, column 0
        used). Several draws per sample and several passes per rollout (``updates_per_rollout`` x
        ``minibatches``, as ORW-CFM trains several epochs on each batch) tame the FM target's noise, which on a
        single draw dominates the weights' signal. Each call draws fresh noise from (seed, it, rank, call).
        With weights of mean 1 the per-point optimum is (w u + alpha v_ref) / (w + alpha), so alpha sets how far
        one rollout's update can move from the reference.
        """
        cc, traj, pipe = self.cfg.flow.critic, rollout.side["traj"], task.pipe
        rows = index.to(traj.latents.device)
        x0 = traj.latents[rows, -1].float()
        cond = cond_select(traj.cond, rows)
        gen = iteration_generator(self.cfg.seed, it, task.rank, salt=4242 + self._fm_calls)
        self._fm_calls += 1
        n = cc.fm_samples
        x0r = x0.repeat(n, *([1] * (x0.dim() - 1)))
        condr = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cond.items()}
        lo, hi = cc.fm_sigma
        sig = (lo + (hi - lo) * torch.rand(len(x0r), generator=gen)).to(x0.device)
        eps = torch.randn(x0r.shape, generator=gen).to(x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        xs = (1 - sig.view(view)) * x0r + sig.view(view) * eps
        v = pipe.velocity(xs.to(pipe.dtype), sig, condr, cfg_scale=None).float()
        with torch.no_grad(), task.reference() as ref:
            v_ref = ref.velocity(xs.to(pipe.dtype), sig, condr, cfg_scale=None).float()
        dims = tuple(range(1, x0.dim()))
        fm = ((v - (eps - x0r)) ** 2).mean(dim=dims)
        w2 = ((v - v_ref) ** 2).mean(dim=dims)
        weight = w[:, 0].repeat(n)
        per = (weight * fm + cc.w2_alpha * w2).view(n, -1).T  # [b, n]
        mask = batch.mask[:, :1].expand(-1, n)
        loss = aggregate(per, mask, "token_mean")
        task.acc.backward(loss)
        return {"acflow/fm": float(fm.detach().mean()), "acflow/w2": float(w2.detach().mean()),
                "acflow/loss": float(loss.detach())}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.critic is None or self.critic_opt is None:
            return {}
        return {"critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending = state  # applied once the critic's lazy layers are built
