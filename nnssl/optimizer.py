"""The two optimizers nnssl's recipes choose from, built in one place for pretraining and fine-tuning alike."""

from typing import Iterable, Tuple

import torch

OPTIMIZERS = ("sgd", "adamw")


def recipe_optimizer(parameters: Iterable, kind: str, lr: float, weight_decay: float,
                     betas: Tuple[float, float] = (0.9, 0.999), amsgrad: bool = False) -> torch.optim.Optimizer:
    """``"sgd"``: nnU-Net's SGD (Nesterov momentum 0.99); ``"adamw"``: AdamW with ``betas`` and ``amsgrad``.

    ``parameters`` may be parameter groups."""
    if kind == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas, amsgrad=amsgrad)
    return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
