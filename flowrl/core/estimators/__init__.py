"""The built-in advantage estimators, grouped by what they assign credit to; each registers itself on import.

- ``outcome``: one advantage per trajectory (grpo, dr_grpo, rloo, reinforce_pp_baseline, gdpo);
- ``token``: rewards and returns over the actions (reinforce_pp, gae, prime, empg);
- ``step``: credit per step (stepwise_grpo, tp_grpo, step_returns, dual_level, igpo, spae);
- ``tree``: credit shared along common prefixes (tree_mc, salt);
- ``passk``: the pass@k advantage (pass_at_k), from the group's count of correct samples;
- ``common``: the helpers they share.
"""
from . import outcome, passk, step, token, tree  # noqa: F401  (each module registers its estimators)
