"""Smoke-run controls: environment variables that override the training schedule of every nnssl trainer.

They let a user (or a test) run any trainer for a few iterations through the stock ``nnUNetv2_train`` without
writing a variant class. They are applied right before ``initialize()`` builds the LR schedule, so they win over
the trainer's own defaults and over ``_5epochs``-style variants.
"""

from typing import Optional

import torch

from nnssl.integration.environment import positive_int_from_environment

VALIDATION_TTA_OFF_VARIABLE = "nnssl_val_disable_tta"
# nnUNetv2_train -device cpu gives torch every core; on a machine shared with other jobs that oversubscribes it, and
# OpenMP's spinning threads then made a 32^3 training step 8-25x slower (2 threads) than one thread (measured).
TORCH_THREADS_VARIABLE = "nnssl_torch_threads"
SCHEDULE_VARIABLES = {
    "nnssl_num_epochs": "num_epochs",
    "nnssl_iterations_per_epoch": "num_iterations_per_epoch",
    "nnssl_val_iterations_per_epoch": "num_val_iterations_per_epoch",
}


def apply_schedule_overrides(trainer) -> dict:
    """Set the trainer attributes named by the variables that are set; return ``{attribute: value}`` applied."""
    applied = {}
    for variable, attribute in SCHEDULE_VARIABLES.items():
        value = positive_int_from_environment(variable, None)
        if value is not None:
            setattr(trainer, attribute, value)
            applied[attribute] = value
    return applied


def apply_torch_threads_override() -> Optional[int]:
    """``torch.set_num_threads`` from ``nnssl_torch_threads`` when set; returns the thread count torch now uses."""
    threads = positive_int_from_environment(TORCH_THREADS_VARIABLE, None)
    if threads is None:
        return None
    torch.set_num_threads(threads)
    return torch.get_num_threads()
