"""flowrl: reinforcement learning for flow-matching generators and LLMs on one trajectory/advantage core."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``flowrl.sample(pipeline, prompts, num_steps=...)``, imported on first use so that ``import flowrl.core``
    loads nothing above the core."""
    if name == "sample":
        from flowrl.flow.sampler import sample

        return sample
    raise AttributeError(f"module 'flowrl' has no attribute {name!r}")
