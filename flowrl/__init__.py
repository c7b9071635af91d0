"""flowrl: reinforcement learning for flow-matching generators and LLMs on one trajectory/advantage core."""
__version__ = "0.1.0"

from flowrl.flow.sampler import sample  # noqa: E402  flowrl.sample(pipeline, prompts, num_steps=...)
