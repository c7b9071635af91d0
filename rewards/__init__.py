"""Reward models and process reward models (import flowrl.rewards).

The interface, registry and combination live in :mod:`flowrl.rewards.base`; image rewards in
``image``, video in ``video``, flow process rewards in ``flow_process``, text in ``text*``, the HTTP
reward server in ``server`` / ``client``.
"""
from .base import (  # noqa: F401
    PROCESS_REWARDS,
    REWARDS,
    CombinedReward,
    FlowProcessReward,
    MissingWeightsError,
    OutcomeReward,
    Reward,
    RewardError,
    TextProcessReward,
    build_process_reward,
    build_reward,
    build_rewards,
    register_process_reward,
    register_reward,
)
