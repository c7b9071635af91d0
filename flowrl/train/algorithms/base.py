"""The interface of a training algorithm (see :mod:`flowrl.train.algorithms`).

An algorithm is a class registered with ``@register_algorithm("name")``. The trainer builds one per run
(``Algorithm(cfg)``), hands it to the task of its ``family`` and calls its hooks:

- ``validate_config(cfg)`` (class method): cross-field checks, run when the config is read, before any model
  loads; raise ``ValueError`` with a sentence that names the keys.
- ``needs_reference(cfg)`` (class method): whether the task keeps a reference policy.
- ``build_task(cfg, accelerator)`` (class method): the task that runs it (the family bases implement it).
- ``prepare_update(task, rollout, batch, adv, it) -> (adv, metrics)``: before the updates (train a critic,
  an implicit PRM; replace the advantages).
- ``backward(task, rollout, index, batch, adv, it) -> metrics``: the loss of one minibatch, backpropagated.
- ``state_dict()`` / ``load_state_dict(state)``: the algorithm's own state in checkpoints.

The family bases (``flow_base.FlowAlgorithm``, ``llm_base.LLMAlgorithm``) add the rollout hooks of their
family and a default ``backward``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # types only: the config module reads this package's registry
    from flowrl.core import TrajectoryBatch
    from flowrl.train.task import Rollout


class Algorithm:
    """Base class of every registered algorithm (see the module docstring)."""

    name: str = ""
    family: str = ""  # "flow" or "llm": which task runs it and which config section it reads

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # ------------------------------------------------------------------ config-time hooks
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Cross-field checks of ``cfg`` for this algorithm; raise ValueError naming the keys."""

    @classmethod
    def needs_reference(cls, cfg: Any) -> bool:
        """Whether the task keeps a reference policy (a KL term, a W2 regulariser, an implicit PRM)."""
        return cfg.loss.kl_beta > 0

    @classmethod
    def build_task(cls, cfg: Any, accelerator: Any):
        """The task that runs this algorithm on ``accelerator`` (the family bases implement it)."""
        raise NotImplementedError(f"algorithm {cls.name!r} has no family base (FlowAlgorithm or LLMAlgorithm)")

    # ------------------------------------------------------------------ update hooks
    def prepare_update(self, task: Any, rollout: "Rollout", batch: "TrajectoryBatch", adv: Tensor,
                       it: int) -> tuple[Tensor, dict[str, float]]:
        """Before the updates of iteration ``it``; may replace the advantages. Default: nothing."""
        return adv, {}

    def backward(self, task: Any, rollout: "Rollout", index: Tensor, batch: "TrajectoryBatch", adv: Tensor,
                 it: int) -> dict[str, float]:
        """Backpropagate the loss of minibatch ``index``; returns its metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called on resume, before the first iteration)."""
