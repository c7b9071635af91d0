"""Tree and graph estimators: trajectories of a group that share a prefix share its credit.

``batch.node[i, k]`` is the id of the state after step k of trajectory i; ids equal inside a group mark one tree
node (TreePS-RAG) or graph node (SALT). Values are means over the trajectories through a node. Both compare the
samples of a group (``min_group_size`` 2).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..advantages import register_advantage
from ..batch import TrajectoryBatch
from ..groups import group_advantages, group_index, segment_stats
from .common import dense_ids, f32_zero, present_steps, require_node, segment_mean, to_actions

__all__ = ["tree_mc", "salt"]


@register_advantage("tree_mc", requires=("node",), min_group_size=2)
def tree_mc(batch: TrajectoryBatch, *, cumulative: bool = False, scale: str = "none", eps: float = 1e-4) -> Tensor:
    """Tree Monte-Carlo step advantages (TreePS-RAG, arXiv 2601.06922).

    ``batch.node[i, k]`` is the id of the tree node (the shared prefix) reached after step k; ids merge
    only inside a group. V(n) = mean outcome of the trajectories through node n (each present step of
    a valid trajectory counts once); the root's value is the group's mean outcome.
    A_{i,k} = V(node_{i,k}) - V(node_{i,k-1}), with node_{i,-1} = root (sibling-relative credit); over a
    trajectory these telescope to r_i - mean_g r. ``cumulative=True`` gives V(node_{i,k}) - V(root)
    instead (the sum of the step credits so far). The plain difference V(n) - V(parent), with no extra outcome
    term; scale "group" divides by (std_g r + eps).
    On a tree where every trajectory is its own branch from the root, step 0 gets r_i - mean_g r and
    later steps 0 (cumulative: r_i - mean_g r on every step).

    batch.node: long [B, S]; batch.outcome: float [B]. Returns float [B, T].
    """
    if scale not in ("none", "group"):
        raise ValueError(f"tree_mc: scale={scale!r}; valid values are ('none', 'group')")
    node = require_node(batch, "tree_mc")
    S = node.shape[1]
    present = present_steps(batch, S)
    zero = f32_zero(batch.device)
    r = torch.where(batch.valid, batch.outcome.to(torch.float32), zero)
    kid, K = dense_ids(batch.group, node)
    vals = r[:, None].expand(-1, S).reshape(-1)
    V = segment_mean(vals, kid.reshape(-1), max(K, 1), present.reshape(-1))[kid]  # [B, S]
    inv, G = group_index(batch.group)
    gs = segment_stats(r, inv, G, batch.valid & present.any(dim=1))
    root = gs.mean[inv]
    if cumulative:
        a = V - root[:, None]
    else:
        parent = torch.cat([root[:, None], V[:, :-1]], dim=1)
        a = V - parent
    if scale == "group":
        a = a / (gs.std[inv][:, None] + eps)
    a = torch.where(present, a, zero)
    return to_actions(a, batch)


@register_advantage("salt", requires=("node",), min_group_size=2)
def salt(batch: TrajectoryBatch, *, baseline: str = "mean", scale: str = "group", eps: float = 1e-4) -> Tensor:
    """SALT (arXiv 2510.20022): step advantages refined over the group's trajectory graph.

    a_i = trajectory-level advantage (``group_advantages`` with ``baseline``/``scale``: GRPO by default,
    RLOO with baseline "loo", scale "none"). Steps of one group whose ``batch.node`` ids coincide (same
    history and action) are one graph node; A(n) = mean of a_i over the present steps at n (each
    passage counts once), and step k of trajectory i gets A(node_{i,k}). A(n) is a plain,
    unweighted mean over passages. Shared neutral steps drift to 0; a step no other trajectory
    shares keeps a_i, so with no shared steps this is the plain trajectory advantage.

    batch.node: long [B, S]. Returns float [B, T].
    """
    node = require_node(batch, "salt")
    S = node.shape[1]
    present = present_steps(batch, S)
    a = group_advantages(batch.outcome, batch.group, baseline=baseline, scale=scale, eps=eps, valid=batch.valid)
    kid, K = dense_ids(batch.group, node)
    vals = a[:, None].expand(-1, S).reshape(-1)
    A = segment_mean(vals, kid.reshape(-1), max(K, 1), present.reshape(-1))[kid]
    A = torch.where(present, A, f32_zero(batch.device))
    return to_actions(A, batch)
