"""What the training loop and the tasks share: the :class:`Task` protocol, the :class:`Rollout` a task hands to
the loop, the per-iteration random streams, and :class:`TaskBase`, the plumbing both model families use.

A *task* is the model-family half of training (flow: :mod:`flowrl.train.flow_task`; LLM:
:mod:`flowrl.train.llm_task`); a registered *algorithm* (:mod:`flowrl.train.algorithms`) decides what a task's
rollout records and what its update optimises. The loop (:mod:`flowrl.train.loop`) imports this module and
never a concrete task.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from flowrl.core import TrajectoryBatch


@dataclasses.dataclass
class Rollout:
    """What a task's rollout hands to the loop: the batch (rewards filled, no advantages yet), the
    model-specific tensors beside it (``side``, read only by the task and its algorithm) and metrics."""

    batch: TrajectoryBatch
    side: Any
    metrics: dict[str, float]


class Task(Protocol):
    """The model-family half of training. ``module`` is what the optimiser updates."""

    module: nn.Module

    def set_forward_module(self, module: nn.Module) -> None:
        """Forward training passes through ``module`` (the DDP/FSDP-wrapped ``self.module``)."""
        ...

    def rollout(self, it: int, generator: torch.Generator) -> Rollout: ...

    def prepare_update(self, rollout: Rollout, batch: TrajectoryBatch, adv: Tensor, it: int) -> tuple[Tensor, dict]:
        """Hook before the updates (e.g. train a critic); may replace the advantages. Returns (adv, metrics)."""
        ...

    def backward(self, rollout: Rollout, index: Tensor, batch: TrajectoryBatch, adv: Tensor, it: int) -> dict: ...

    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...

    def export(self, out_dir: Path) -> None:
        """Write the trained weights (a LoRA, or the full model) into ``out_dir``."""
        ...

    def load_export(self, out_dir: Path) -> None:
        """Load what :meth:`export` wrote (a finished run's trained weights) into the model."""
        ...

    def report_plan(self) -> Any:
        """What the run's ``report.md`` shows and checks (a ``flowrl.train.report.ReportPlan``), or None for the
        generic report of the logged metrics."""
        ...


def iteration_generator(seed: int, it: int, rank: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for iteration ``it`` of rank ``rank`` (independent streams by ``salt``).

    Every random draw of an iteration comes from such a stream, so a run resumed from a checkpoint continues
    exactly as the uninterrupted run, and R ranks draw what one process draws where the task says so.
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + it) * 7919 + rank) * 31 + salt)


def all_reduce_mean_grads(module: nn.Module, world: int) -> None:
    """Average the gradients of ``module`` over ``world`` ranks (for a second model the loop does not wrap:
    a critic, an implicit PRM). A no-op on one rank."""
    if world <= 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


class TaskBase:
    """Plumbing every task shares: the algorithm's state in checkpoints, the frozen reference copy, the
    forward module under DDP/FSDP.

    Subclasses set ``self.cfg``, ``self.acc``, ``self.algorithm`` and ``self.module`` and call
    :meth:`init_reference` once the trainable module exists.
    """

    cfg: Any
    acc: Any
    algorithm: Any
    module: nn.Module
    # the module as ``accelerator.prepare`` returned it (a DDP/DeepSpeed wrapper, or ``module`` itself sharded in
    # place by FSDP2); the loop sets it. ``grad_sync`` needs it to hold back a chunk's gradient reduction.
    prepared_module: Optional[nn.Module] = None

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    def init_reference(self, needs_reference: bool) -> None:
        """Keep a frozen copy of the initial weights when a reference policy is needed and LoRA is off (with
        LoRA, the reference is the same model with its adapters disabled: no copy)."""
        self._ref_module: Optional[nn.Module] = None
        if needs_reference and not self.cfg.lora.enabled:
            self._ref_module = copy.deepcopy(self.module).requires_grad_(False).eval()

    @property
    def reference_module(self) -> Optional[nn.Module]:
        """The frozen copy of the initial weights (None under LoRA or when no reference is needed)."""
        return getattr(self, "_ref_module", None)

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """The reference policy, as the object the task's forward passes take (a pipeline or a model).
        Subclasses implement it through their model protocol."""
        raise NotImplementedError
        yield  # pragma: no cover

    # The algorithm keeps its own state (a critic, an implicit PRM); checkpoints carry it beside the model.
    def extra_state(self) -> dict[str, Any]:
        return self.algorithm.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.algorithm.load_state_dict(state)

    @contextlib.contextmanager
    def grad_sync(self, last: bool) -> Iterator[None]:
        """Wrap the forward AND backward of one chunk of an optimiser step's loss (gradient accumulation).

        Chunks before the ``last`` accumulate locally: under DDP and FSDP2 (``accelerator.no_sync``) nothing is
        all-reduced / reduce-scattered, and under DeepSpeed ``accelerator.backward`` does not step the engine
        (``sync_gradients`` False: the engine's accumulation boundary is the last chunk). The last chunk reduces
        the accumulated gradients once. On one process without DeepSpeed this changes nothing. DDP decides at
        the forward pass whether the backward reduces, so the forward must be inside the block too.
        """
        if last or self.prepared_module is None:
            yield
            return
        state = self.acc.gradient_state
        before = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            with self.acc.no_sync(self.prepared_module):
                yield
        finally:
            state._set_sync_gradients(before)

    def load_export(self, out_dir: Path) -> None:
        """Load what ``export(out_dir)`` wrote (a finished run's trained weights) into this task's model."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a finished run's export")

    def report_plan(self) -> Any:
        return None

    def prepare_update(self, rollout: Rollout, batch: TrajectoryBatch, adv: Tensor, it: int) -> tuple[Tensor, dict]:
        return self.algorithm.prepare_update(self, rollout, batch, adv, it)

    def backward(self, rollout: Rollout, index: Tensor, batch: TrajectoryBatch, adv: Tensor, it: int) -> dict:
        return self.algorithm.backward(self, rollout, index, batch, adv, it)
