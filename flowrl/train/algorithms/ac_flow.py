"""AC-Flow: actor-critic flow fine-tuning with a critic-weighted flow-matching loss (likelihood-free).

A critic V(x_t, sigma_t, c) (:class:`flowrl.train.critic.FlowCritic`) regresses the group-normalised reward G
(normalised reward shaping: the advantage estimator's output, e.g. ``grpo``) on every noisy state of the
rollouts. After a warm-up, each trained step k of sample b gets its own advantage A[b, k] = clip(G_b - V(x_{b,k},
sigma_k)) (per-step credit: the critic is read before it is fitted to this iteration's rollouts), which sets a
weight w = exp(A / tau) (ORW-CFM-W2, Fan et al., 2025) or max(A, 0) (``flow.critic.weighting``), normalised to
mean 1, on a conditional flow-matching term at that step's own noise level sigma_k, plus alpha * ||v - v_ref||^2
(the Wasserstein-2 bound toward the reference). No SDE log-prob enters the update. Recipe:
``configs/digits/ac_flow.yaml``; the options are ``flow.critic``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from flowrl.core import TrajectoryBatch, aggregate
from flowrl.flow.pipeline import cond_repeat, cond_select
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm
from flowrl.train.critic import FlowCritic, advantage_weights, critic_inputs, step_advantages
from flowrl.train.task import Rollout, all_reduce_mean_grads, iteration_generator


CRITIC_INIT_SALT = 90001  # the critic's initial weights: a stream of their own


def _all_reduce_sum(t: Tensor) -> Tensor:
    torch.distributed.all_reduce(t)
    return t


def weighted_flow_matching(velocity: Callable, ref_velocity: Callable, x0: Tensor, cond: dict, sig: Tensor,
                           eps: Tensor, w: Tensor, mask: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """AC-Flow's actor loss: flow matching at each trained step's own noise level, weighted by that step's A.

    For every sample b, trained step t and draw j (x0_b the rollout's final latent, eps_{b,t,j} ~ N(0, I)):
      x = (1 - sig_t) x0_b + sig_t eps_{b,t,j},   u = eps_{b,t,j} - x0_b   (the straight path's velocity)
      l_{b,t,j} = w_{b,t} mean ||v_theta(x, sig_t, c_b) - u||^2 + alpha mean ||v_theta(x, ...) - v_ref(x, ...)||^2
      L = sum_{b,t,j} mask_{b,t} l_{b,t,j} / sum_{b,t,j} mask_{b,t}        (token_mean, global over ranks)
    (squared norms averaged over the latent's elements). With every w = 1 this is plain flow matching on the
    model's own samples, whose fixed point is the model itself; the weights tilt it toward the better steps.
    x0 float [b, ...]; cond the b samples' conditioning rows; sig float [T] (sigma_{k_t} of trained step t);
    eps float [b, T, n, ...]; w float [b, T]; mask bool [b, T]. ``velocity`` and ``ref_velocity`` map
    (x float [N, ...], sigma float [N], cond rows [N, ...]) -> float [N, ...] on N = b * T * n points at once
    (row-major b, t, j); ``ref_velocity`` is called under no_grad. Returns (loss, mean fm term, mean W2 term).
    """
    b, T, n = eps.shape[:3]
    lat = tuple(x0.shape[1:])
    if eps.shape[3:] != x0.shape[1:] or sig.shape != (T,) or w.shape != (b, T) or mask.shape != (b, T):
        raise ValueError(f"weighted_flow_matching: x0 [b, ...], sig [T], eps [b, T, n, ...], w and mask [b, T] "
                         f"expected; got {tuple(x0.shape)}, {tuple(sig.shape)}, {tuple(eps.shape)}, "
                         f"{tuple(w.shape)}, {tuple(mask.shape)}")
    s = sig.to(x0.dtype).view((1, T, 1) + (1,) * len(lat))
    x0e = x0[:, None, None]
    xs = ((1 - s) * x0e + s * eps).reshape((b * T * n,) + lat)
    u = (eps - x0e).reshape((b * T * n,) + lat)
    sig_n = sig[None, :, None].expand(b, T, n).reshape(-1)
    cond_n = cond_repeat(cond, T * n)
    v = velocity(xs, sig_n, cond_n).float()
    with torch.no_grad():
        v_ref = ref_velocity(xs, sig_n, cond_n).float()
    dims = tuple(range(1, x0.dim()))
    fm = ((v - u) ** 2).mean(dim=dims).view(b, T * n)
    w2 = ((v - v_ref) ** 2).mean(dim=dims).view(b, T * n)
    per = w.repeat_interleave(n, dim=1) * fm + alpha * w2
    loss = aggregate(per, mask.repeat_interleave(n, dim=1), "token_mean")
    return loss, fm.detach().mean(), w2.detach().mean()


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

    # ------------------------------------------------------------------ critic step -> step weights
    def prepare_update(self, task, rollout: Rollout, batch: TrajectoryBatch, adv: Tensor, it: int):
        """AC-Flow's per-step advantages, the weights of the actor's flow-matching terms, then the critic's fit.

        G float [B] = the estimator's group-normalised reward (normalised reward shaping). First the critic as it
        stands (fitted on earlier iterations only, so these rollouts are held out from it) values every state:
        V[b, k] = V(x_{b,k}, sigma_k, c_b), k < K. Trained step t (denoising step k_t = ``steps[t]``) of sample b
        gets A[b, t] = clip(G_b - V[b, k_t], +-adv_clip) (:func:`flowrl.train.critic.step_advantages`), or
        A[b, t] = G_b during the warm-up (it < warmup_iters: the actor does not use the critic). Weight
        (``weighting``): exp: w = exp(A / tau); positive: w = max(A, 0) (only steps that beat their state's
        expected return are fitted); then w /= its mean over the valid (b, t) (global over ranks), 0 off mask.
        With ``positive``, a batch where no A > 0 gets w = 0: only the W2 term acts (``critic/weight_pos_frac``
        logs the share of steps fitted). Then the critic regresses G on every state (``updates_per_iter`` Adam
        steps), for the next iteration. Returns w float [B, T] and metrics (``critic/explained_var`` is the
        pre-fit critic's, measured on data it has not seen).
        """
        cc, traj, steps = self.cfg.flow.critic, rollout.side["traj"], rollout.side["steps"]
        valid = batch.valid
        G = adv[:, 0].detach()
        rows = torch.arange(traj.batch_size, device=G.device)
        x, sigma, cond, K = critic_inputs(traj, rows)
        if self.critic_opt is None:  # the first update: the critic's input shapes are known only now
            self._build_critic(x, sigma, cond, x.device)
            if self._pending is not None:  # resumed: the lazy layers exist only now
                self.critic.load_state_dict(self._pending["critic"])
                self.critic_opt.load_state_dict(self._pending["critic_opt"])
                self._pending = None
        warm = it < cc.warmup_iters
        with torch.no_grad():  # before the fit: a critic fitted to these very samples would pull A toward 0
            v = self.critic(x, sigma, cond).view(-1, K).float()
            a = G[:, None].expand(-1, batch.mask.shape[1]) if warm else step_advantages(G, v, steps, cc.adv_clip)
            w = advantage_weights(a, batch.mask, weighting=cc.weighting, temperature=cc.temperature,
                                  reduce=_all_reduce_sum if task.world > 1 else None)
            ev = 1 - ((G[:, None] - v)[valid].var() / G[valid].var().clamp_min(1e-8))
            a_valid = a[batch.mask]
        target = G.repeat_interleave(K)
        w_valid = valid.repeat_interleave(K).float()
        for _ in range(cc.updates_per_iter):  # a few regression steps per iteration
            pred = self.critic(x, sigma, cond)
            loss = ((pred - target) ** 2 * w_valid).sum() / w_valid.sum().clamp_min(1)
            self.critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_mean_grads(self.critic, task.world)
            self.critic_opt.step()
        self._fm_calls = 0  # FM noise draws of this iteration's updates: one fresh stream per backward call
        metrics = {"critic/loss": float(loss.detach()), "critic/explained_var": float(ev), "critic/warmup": float(warm),
                   "critic/adv_mean": float(a_valid.mean()) if a_valid.numel() else float("nan"),
                   "critic/weight_max": float(w.max()), "critic/weight_pos_frac": float((w[batch.mask] > 0).float().mean())}
        return w, metrics

    # ------------------------------------------------------------------ actor: weighted flow matching
    def backward(self, task, rollout: Rollout, index: Tensor, batch: TrajectoryBatch, w: Tensor, it: int) -> dict:
        """Critic-weighted conditional flow matching with the W2 regulariser (AC-Flow; ORW-CFM-W2, Fan et al.), on
        the minibatch rows ``index``: :func:`weighted_flow_matching` with x0_b the rollout's final latent, sig_t
        = sigma_{k_t} of each trained step, n = ``fm_samples`` fresh eps per (b, t) and w float [b, T] from
        :meth:`prepare_update`. Several draws and several passes per rollout (``updates_per_rollout`` x
        ``minibatches``, as ORW-CFM trains several epochs on each batch) tame the FM target's noise. Each call
        draws fresh noise from (seed, it, rank, call). With weights of mean 1 the per-point optimum is
        (w u + alpha v_ref) / (w + alpha), so alpha sets how far one rollout's update can move from the reference.
        Points per call: b * T * n (one forward of the model and one of the reference): ``minibatches`` sets
        the memory.
        """
        cc, traj, pipe = self.cfg.flow.critic, rollout.side["traj"], task.pipe
        steps = rollout.side["steps"]
        rows = index.to(traj.latents.device)
        x0 = traj.latents[rows, -1].float()
        sig = traj.sigmas.to(x0.device)[steps.to(x0.device)].float()
        gen = iteration_generator(self.cfg.seed, it, task.rank, salt=4242 + self._fm_calls)
        self._fm_calls += 1
        eps = torch.randn((len(rows), len(steps), cc.fm_samples) + tuple(x0.shape[1:]), generator=gen).to(x0.device)

        def velocity(x, s, c):
            return pipe.velocity(x.to(pipe.dtype), s, c, cfg_scale=None)

        def ref_velocity(x, s, c):
            with task.reference() as ref:
                return ref.velocity(x.to(pipe.dtype), s, c, cfg_scale=None)

        loss, fm, w2 = weighted_flow_matching(velocity, ref_velocity, x0, cond_select(traj.cond, rows), sig, eps,
                                              w, batch.mask, cc.w2_alpha)
        task.acc.backward(loss)
        return {"acflow/fm": float(fm), "acflow/w2": float(w2), "acflow/loss": float(loss.detach())}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.critic is None or self.critic_opt is None:
            return {}
        return {"critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending = state  # applied once the critic's lazy layers are built
