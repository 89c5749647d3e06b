"""Writing checkpoints safely, unwrapping the modules nnU-Net wraps (DDP, torch.compile), encoder-only exports."""

import os
from pathlib import Path
from typing import Dict, Union

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


def encoder_only_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a model that keeps its dna encoder as ``encoder`` (heads are not transferred).

    What the methods export whose head or decoder is discarded after pretraining (VoCo's projector, AMAES'
    decoder).
    """
    return {f"encoder.{key}": value for key, value in model.encoder.state_dict().items()}
