"""Checkpoints: the pretraining checkpoint as pure functions, safe writing, unwrapping the modules nnU-Net wraps
(DDP, torch.compile), encoder-only exports."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

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


@dataclass
class PretrainingCheckpoint:
    """Everything a pretraining checkpoint holds: nnU-Net's own fields, so that ``--c`` and nnU-Net's tools work, and
    nnssl's. ``network_weights`` is the transferable plain-dna state dict (on the CPU, so that stock
    ``-pretrained_weights`` loads it without ``map_location``); ``pretraining_weights`` the whole pretraining model
    (mask tokens, heads) for resuming."""

    network_weights: Dict[str, torch.Tensor]
    pretraining_weights: Dict[str, torch.Tensor]
    optimizer_state: dict
    grad_scaler_state: Optional[dict]
    logging: dict
    best_ema: Optional[float]
    next_epoch: int
    init_args: dict
    trainer_name: str
    inference_allowed_mirroring_axes: Optional[Tuple[int, ...]]
    best_val_loss: Optional[float]
    trainer_state: dict
    adaptation_plan: dict
    citations: List[dict]


# checkpoint key -> PretrainingCheckpoint field; the first nine are nnU-Net 2.8.1's save_checkpoint keys
CHECKPOINT_KEYS = {
    "network_weights": "network_weights",
    "optimizer_state": "optimizer_state",
    "grad_scaler_state": "grad_scaler_state",
    "logging": "logging",
    "_best_ema": "best_ema",
    "current_epoch": "next_epoch",
    "init_args": "init_args",
    "trainer_name": "trainer_name",
    "inference_allowed_mirroring_axes": "inference_allowed_mirroring_axes",
    "nnssl_pretraining_weights": "pretraining_weights",
    "nnssl_best_val_loss": "best_val_loss",
    "nnssl_trainer_state": "trainer_state",
    "nnssl_adaptation_plan": "adaptation_plan",
    "citations": "citations",
}


def checkpoint_dict(checkpoint: PretrainingCheckpoint) -> dict:
    """The dict written to disk (network weights moved to the CPU)."""
    fields = {key: getattr(checkpoint, field) for key, field in CHECKPOINT_KEYS.items()}
    fields["network_weights"] = {k: v.detach().cpu() for k, v in checkpoint.network_weights.items()}
    return fields


def checkpoint_from_dict(checkpoint: dict, source: str) -> PretrainingCheckpoint:
    """The inverse of ``checkpoint_dict``; one error naming the file and every missing key otherwise."""
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise RuntimeError(f"{source} is not an nnssl pretraining checkpoint (missing {', '.join(missing)}); only "
                           f"checkpoints written by an nnssl pretraining trainer can be resumed with it.")
    return PretrainingCheckpoint(**{field: checkpoint[key] for key, field in CHECKPOINT_KEYS.items()})
