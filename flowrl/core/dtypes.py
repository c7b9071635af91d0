"""The one map from a dtype's name in a config to the torch dtype (models, rewards and trainers all read it)."""
from __future__ import annotations

from typing import Union

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def torch_dtype(dtype: Union[str, torch.dtype], *, who: str = "dtype") -> torch.dtype:
    """``dtype`` as a torch dtype: a torch dtype passes through, a name is looked up (an unknown one is an error
    that names ``who`` and the valid names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{who}={dtype!r} is not a dtype; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]
