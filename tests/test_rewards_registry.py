"""The reward registries (rewards/base.py): flowrl.core.registry.Registry instances filled lazily, options
checked against each reward's signature (not guessed from an exception's text)."""
from __future__ import annotations

import pytest
import torch

from flowrl.core.registry import ParameterError, Registry, UnknownNameError
from flowrl.rewards import PROCESS_REWARDS, REWARDS, build_process_reward, build_reward, register_reward


def test_registries_are_core_registries_and_complete():
    assert isinstance(REWARDS, Registry) and isinstance(PROCESS_REWARDS, Registry)
    for n in ("arithmetic", "reasoning_gym", "math_verify", "format_tags", "format_regex", "answer_logprob", "digits"):
        assert n in REWARDS
    for n in ("arithmetic_steps", "prm", "digits_noisy"):
        assert n in PROCESS_REWARDS
    with pytest.raises(UnknownNameError, match="unknown reward 'nope'; valid: .*'reasoning_gym'"):
        build_reward("nope")
    with pytest.raises(UnknownNameError, match="unknown process reward 'nope'; valid: .*'arithmetic_steps'"):
        build_process_reward("nope")


def test_options_are_checked_by_signature():
    with pytest.raises(ParameterError, match=r"reward 'reasoning_gym': unknown parameter\(s\) \['timeout'\]; valid: .*'timeout_s'"):
        build_reward("reasoning_gym", timeout=3)
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['step'\]; valid: \['name', 'num_steps'\]"):
        build_process_reward("arithmetic_steps", step=3)
    # an error raised inside a constructor is not mistaken for an unknown option (nor hidden)
    with pytest.raises(ValueError, match="on_error='zero'"):
        build_reward("arithmetic", on_error="zero")


def test_function_reward_registration():
    @register_reward("test_len_reward")
    def length(samples, prompts, meta):
        return {"test_len_reward": torch.tensor([float(len(s)) for s in samples]),
                "test_len_reward/half": torch.tensor([len(s) / 2 for s in samples])}

    try:
        r = build_reward("test_len_reward", name="len2")
        parts = r(["ab", "abcd"], ["", ""])
        assert parts["len2"].tolist() == [2.0, 4.0] and parts["len2/half"].tolist() == [1.0, 2.0]
        with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['scale'\]; valid: \['name', 'on_error'\]"):
            build_reward("test_len_reward", scale=2)

        def other(samples, prompts, meta):
            return torch.zeros(len(samples))

        with pytest.raises(ValueError, match="'test_len_reward' is already registered"):
            register_reward("test_len_reward")(other)
    finally:
        REWARDS.unregister("test_len_reward")
    assert "test_len_reward" not in REWARDS
