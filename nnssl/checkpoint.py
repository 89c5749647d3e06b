"""Writing checkpoints safely and unwrapping the modules nnU-Net wraps (DDP, torch.compile)."""

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def atomic_torch_save(obj, filename: Union[str, Path]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-save never leaves a truncated checkpoint."""
    filename = str(filename)
    temporary = f"{filename}.tmp-{os.getpid()}"
    torch.save(obj, temporary)
    os.replace(temporary, filename)
