"""``llm_prime``: PRIME (Cui et al., 2025, arXiv 2502.01456), process rewards from an implicit PRM.

A second model, the implicit PRM pi_phi (a copy of the initial policy), is trained online on every rollout
with ``implicit_prm_loss`` from the outcome labels l_i (1 = correct):

    z_i = beta * sum_t (log pi_phi(o_{i,t}) - log pi_ref(o_{i,t})),    L_PRM = mean_i BCE(sigmoid(z_i), l_i),

before or after its token rewards q_t = beta * (log pi_phi - log pi_ref) are read (``llm.prm_update``); the
``prime`` estimator turns them into advantages (with ``advantage.params.batch_norm``, PRIME's default ``prime_norm``,
q divided by max over the batch of |reverse cumsum of q|, so that beta cancels and the process return lies in
[-1, 1]; then RLOO per source, summed returns, whitened). The PRM and its
optimiser are this algorithm's state (saved in checkpoints). Options: ``llm.prm_lr``, ``llm.prm_beta``,
``llm.prm_update``; PRIME's accuracy-band prompt filter is the ``accuracy_band`` shaper.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flowrl.core import compute_advantages, implicit_prm_loss
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.llm_base import LLMAlgorithm
from flowrl.train.task import all_reduce_mean_grads

if TYPE_CHECKING:
    from flowrl.core import TrajectoryBatch
    from flowrl.train.llm_task import LLMTask
    from flowrl.train.task import Rollout


@register_algorithm("llm_prime")
class LLMPrime(LLMAlgorithm):
    """PRIME (see the module docstring). ``prm`` is the implicit PRM, ``prm_opt`` its AdamW."""

    supplies_estimators = ("prime",)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.prm: torch.nn.Module | None = None
        self.prm_opt: torch.optim.Optimizer | None = None

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if cfg.advantage.estimator != "prime":
            raise ValueError(f"algorithm llm_prime feeds the implicit PRM to the 'prime' estimator; set "
                             f"advantage.estimator=prime (got {cfg.advantage.estimator!r})")

    @classmethod
    def needs_reference(cls, cfg: Any) -> bool:
        return True  # the implicit reward is a log-ratio against the reference

    def setup(self, task: "LLMTask") -> None:
        """The implicit PRM: a trainable copy of the initial policy, with its own AdamW at ``llm.prm_lr``."""
        self.prm = copy.deepcopy(task.module).train()
        self.prm_opt = torch.optim.AdamW([p for p in self.prm.parameters() if p.requires_grad], lr=self.cfg.llm.prm_lr)

    def prepare_update(self, task: "LLMTask", rollout: "Rollout", batch: "TrajectoryBatch", adv: Tensor,
                       it: int) -> tuple[Tensor, dict[str, float]]:
        """Train the PRM on this rollout and read its token log-probs (in the order ``llm.prm_update`` says);
        the advantages are the ``prime`` estimator's on them (the loop's ``adv`` is replaced)."""
        s, lc = rollout.side, self.cfg.llm
        labels = s.correct.to(batch.device).float()
        mask = batch.mask & batch.valid[:, None]

        def read() -> Tensor:
            with torch.no_grad():
                return task.logprobs(self.prm, s).float()

        def update() -> dict[str, float]:
            loss, m = implicit_prm_loss(task.logprobs(self.prm, s), batch.ref_logp, mask, labels, beta=lc.prm_beta)
            self.prm_opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_mean_grads(self.prm, task.world)
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([q for q in self.prm.parameters() if q.requires_grad],
                                               self.cfg.optim.grad_clip)
            self.prm_opt.step()
            return {k: float(v) for k, v in m.items()}

        if lc.prm_update == "before":
            m = update()
            prm_lp = read()
        else:
            prm_lp = read()
            m = update()
        params = {"beta": lc.prm_beta, **self.cfg.advantage.params}
        return compute_advantages("prime", batch, prm_logp=prm_lp, **params), m

    def state_dict(self) -> dict[str, Any]:
        return {"prm": dict(self.prm.state_dict()), "prm_opt": self.prm_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prm.load_state_dict(state["prm"])
        self.prm_opt.load_state_dict(state["prm_opt"])
