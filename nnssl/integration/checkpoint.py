"""Checkpoints: the pretraining checkpoint as pure functions, safe writing and reading, unwrapping the modules
nnU-Net wraps (DDP, torch.compile), encoder-only exports."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from nnssl.errors import UserError

# the files nnUNetv2_train --c looks for, in its order
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
LATEST, PREVIOUS = "checkpoint_latest.pth", "checkpoint_previous.pth"  # PREVIOUS: the generation before LATEST


class CheckpointError(UserError, RuntimeError):
    """A checkpoint a trainer cannot resume from: truncated, corrupt, or of another kind (the message names it;
    ``detail`` is the reader's own first line, where there is one)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def atomic_torch_save(obj, filename: Union[str, Path], keep_replaced_as: Optional[str] = None) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-save never leaves a truncated checkpoint. With
    ``keep_replaced_as``, a file the new one replaces is first moved there."""
    filename = str(filename)
    temporary = f"{filename}.tmp-{os.getpid()}"
    torch.save(obj, temporary)
    if keep_replaced_as is not None and os.path.isfile(filename):
        os.replace(filename, keep_replaced_as)
    os.replace(temporary, filename)


def save_checkpoint_generation(obj, filename: Union[str, Path]) -> None:
    """``atomic_torch_save``; a new ``checkpoint_latest.pth`` first moves the one it replaces to
    ``checkpoint_previous.pth``, so that a latest checkpoint found unreadable later still has a predecessor."""
    filename = str(filename)
    is_latest = os.path.basename(filename) == LATEST
    atomic_torch_save(obj, filename, os.path.join(os.path.dirname(filename), PREVIOUS) if is_latest else None)


def previous_generation(filename: str) -> Optional[str]:
    """``checkpoint_previous.pth`` next to a ``checkpoint_latest.pth`` (None for other files or when absent)."""
    if os.path.basename(filename) != LATEST:
        return None
    previous = os.path.join(os.path.dirname(filename), PREVIOUS)
    return previous if os.path.isfile(previous) else None


def read_checkpoint_or_previous(filename: str, map_location: Union[str, torch.device, None],
                                say: Callable[[str], None]) -> Tuple[dict, str]:
    """``read_checkpoint(filename)`` and the file read; an unreadable ``checkpoint_latest.pth`` falls back to the
    previous generation, and ``say`` tells which file was skipped and why."""
    try:
        return read_checkpoint(filename, map_location=map_location), filename
    except CheckpointError as error:
        previous = previous_generation(filename)
        if previous is None:
            raise
        checkpoint = read_checkpoint(previous, map_location=map_location)
        say(f"{filename} cannot be read (torch.load: {error.detail}); "
            f"resuming from the previous generation {previous} (epoch {checkpoint.get('current_epoch')}) instead")
        return checkpoint, previous


def read_checkpoint(filename: str, map_location: Union[str, torch.device, None] = None, weights_only: bool = False,
                    load: Callable = torch.load) -> dict:
    """``torch.load`` of a checkpoint to resume or validate from; a file it cannot decode (cut short by a full disk
    or a copy, overwritten) is an error naming the file and the way out, not torch's zip-reader traceback.

    Its signature is ``torch.load``'s, so a trainer can put it in torch.load's place while nnU-Net's own
    ``load_checkpoint`` runs (``load`` stays the real torch.load).
    """
    try:
        return load(filename, map_location=map_location, weights_only=weights_only)
    except OSError:
        raise  # permissions and the like: reported as such
    except Exception as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{filename} is truncated or corrupt (torch.load: {detail}), so nothing can be "
                              f"restored from it. {way_out(filename)}", detail) from None


def way_out(filename: str) -> str:
    """What to do about an unusable checkpoint: the next one ``--c`` would take once it is moved away, or starting
    over."""
    folder, name = os.path.split(os.path.abspath(filename))
    others = [other for other in RESUME_ORDER if other != name and os.path.isfile(os.path.join(folder, other))]
    move = f"Move it away (mv {filename} {filename}.bad)"
    if others:
        return f"{move} and rerun with --c to resume from {others[0]}, or rerun without --c to start over."
    return f"{move} and rerun without --c to start over (the folder has no other checkpoint)."


def kept_checkpoints_note(output_folder: str) -> str:
    """What an interrupted training leaves to resume from (said when the user presses Ctrl-C)."""
    kept = [name for name in RESUME_ORDER if os.path.isfile(os.path.join(output_folder, name))]
    if kept:
        return (f"{output_folder} keeps {', '.join(kept)}; rerun the same command with --c to resume from "
                f"{kept[0]}.")
    return f"No checkpoint was written yet in {output_folder}; rerun the same command to start again."


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
        raise CheckpointError(f"{source} is not an nnssl pretraining checkpoint (missing {', '.join(missing)}); only "
                           f"checkpoints written by an nnssl pretraining trainer can be resumed with it.")
    return PretrainingCheckpoint(**{field: checkpoint[key] for key, field in CHECKPOINT_KEYS.items()})
