"""Reward models and process reward models (import flowrl.rewards).

The interface, registry and combination live in :mod:`flowrl.rewards.base`; building from a config (registered
names and references to the user's own code) in ``build`` and ``user``; image rewards in
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
    register_process_reward,
    register_reward,
)
from .build import build_process_reward, build_reward, build_rewards, check_reward_spec  # noqa: F401
