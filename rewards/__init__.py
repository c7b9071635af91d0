"""Reward models and process reward models (import flowrl.rewards)."""
