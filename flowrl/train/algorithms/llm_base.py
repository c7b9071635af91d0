"""The LLM family of algorithms: what every LLM algorithm shares, and its hooks.

An LLM algorithm is a subclass of :class:`LLMAlgorithm` registered with ``@register_algorithm("name")``; the
trainer runs it on :class:`flowrl.train.llm_task.LLMTask`, which samples, scores and recomputes log-probs.
What an algorithm may change, each a method to override:

- ``validate_config(cfg)``: its cross-field checks (call ``super()`` to keep the family's);
- ``needs_reference(cfg)``: whether the task keeps a reference policy;
- ``setup(task)``: once the task's model exists (build a second model, an optimiser);
- ``prepare_update(task, rollout, batch, adv, it)``: before the updates (train a model, replace advantages);
- ``loss(task, rollout, index, batch, adv, logp)``: the loss of one minibatch from its recomputed log-probs
  (default: the registered policy loss ``loss.name`` plus ``loss.kl_beta`` times the aggregated KL);
- ``backward(...)``: recompute, ``loss``, backpropagate (rarely overridden);
- ``state_dict()`` / ``load_state_dict(state)``: its own state in checkpoints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from flowrl.core import aggregate, compute_policy_loss, kl_estimate
from flowrl.train.algorithms import ALGORITHMS
from flowrl.train.algorithms.base import Algorithm

if TYPE_CHECKING:
    from flowrl.core import TrajectoryBatch
    from flowrl.train.llm_task import LLMTask
    from flowrl.train.task import Rollout


class LLMAlgorithm(Algorithm):
    """Base of the LLM algorithms (see the module docstring)."""

    family = "llm"
    # Advantage estimators whose extra inputs only this algorithm supplies (PRIME: the implicit PRM's log-probs).
    supplies_estimators: tuple[str, ...] = ()

    # ------------------------------------------------------------------ config-time hooks
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """The family's cross-field checks: an estimator that another algorithm supplies, a shaper that needs a
        process reward, a negative KL weight; the dataset (registered, its keys, a reward for it)."""
        from flowrl.train.llm_data import check_llm_data
        from flowrl.train.llm_shaping import SHAPERS

        check_llm_data(cfg)  # here, after the plug-ins: a plug-in may register the dataset kind

        est = cfg.advantage.estimator
        if est not in cls.supplies_estimators:
            owners = [n for n in ALGORITHMS.names() if est in getattr(ALGORITHMS[n], "supplies_estimators", ())]
            if owners:
                raise ValueError(f"advantage.estimator={est} needs algorithm={' or '.join(owners)} (its inputs come "
                                 f"from that algorithm); got algorithm={cfg.algorithm}")
        lc = cfg.llm
        if lc.shaping is not None and SHAPERS.meta(lc.shaping).get("needs_process_reward") and lc.process_reward is None:
            raise ValueError(f"llm.shaping={lc.shaping!r} needs llm.process_reward (the step scores it gates/filters on)")
        if cfg.loss.kl_beta < 0:
            raise ValueError(f"loss.kl_beta={cfg.loss.kl_beta} must be >= 0")
        if cfg.prompts_per_iter < 1 or cfg.group_size < 1:
            raise ValueError(f"prompts_per_iter={cfg.prompts_per_iter} and group_size={cfg.group_size} must both be >= 1")

    @classmethod
    def needs_reference(cls, cfg: Any) -> bool:
        """A KL in the loss (``loss.kl_beta``), in the reward (``llm.kl_in_reward``) or in the estimator
        (``advantage.params.kl_coef``) needs the reference policy's log-probs."""
        return (cfg.loss.kl_beta > 0 or cfg.llm.kl_in_reward > 0
                or float(cfg.advantage.params.get("kl_coef", 0.0)) > 0)

    @classmethod
    def build_task(cls, cfg: Any, accelerator: Any) -> "LLMTask":
        from flowrl.train.llm_task import LLMTask

        return LLMTask(cfg, accelerator, algorithm=cls(cfg))

    # ------------------------------------------------------------------ run-time hooks
    def setup(self, task: "LLMTask") -> None:
        """Called once the task's model (and its reference) exist. Default: nothing."""

    def loss(self, task: "LLMTask", rollout: "Rollout", index: Tensor, batch: "TrajectoryBatch", adv: Tensor,
             logp: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The loss of minibatch ``index`` (rows of the rollout; ``batch`` and ``adv`` are already those rows)
        from its recomputed log-probs ``logp`` float [n, T], with grad.

        L = agg(loss.name(logp, old_logp, A) [* IS weights]) + loss.kl_beta * agg(KL_kind(logp || ref_logp)),
        ``agg`` = ``loss.agg`` over ``batch.mask``. Returns (loss 0-dim, metrics).
        """
        cfg, lc, s = self.cfg, self.cfg.llm, rollout.side
        kw = dict(cfg.loss.params)
        if s.is_w is not None:
            kw["is_weights"] = s.is_w[index]
        if cfg.loss.agg == "seq_mean_token_sum_norm":
            kw.setdefault("max_len", lc.max_new_tokens)
        loss, lm = compute_policy_loss(cfg.loss.name, logp, batch.old_logp, adv, batch.mask, agg=cfg.loss.agg, **kw)
        if cfg.loss.kl_beta > 0:
            kl = aggregate(kl_estimate(logp, batch.ref_logp, lc.kl_kind), batch.mask, cfg.loss.agg,
                           max_len=lc.max_new_tokens)
            loss = loss + cfg.loss.kl_beta * kl
            lm["policy/kl"] = kl.detach()
        return loss, lm

    def backward(self, task: "LLMTask", rollout: "Rollout", index: Tensor, batch: "TrajectoryBatch", adv: Tensor,
                 it: int) -> dict[str, float]:
        """Recompute the minibatch's log-probs through the forward module, take :meth:`loss`, backpropagate."""
        idx = index.to(rollout.side.input_ids.device)
        logp = task.logprobs(task.forward_module, rollout.side, idx)
        loss, lm = self.loss(task, rollout, idx, batch, adv, logp)
        task.acc.backward(loss)
        out = {k: float(v) for k, v in lm.items()}
        out["policy/loss"] = float(loss.detach())
        return out
