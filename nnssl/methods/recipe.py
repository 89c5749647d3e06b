"""The pretraining recipe: how every pretraining method is optimised, in one frozen value.

The S3D recipe (SGD 1e-2 with Nesterov momentum 0.99, weight decay 3e-5, poly decay, gradient clipping at 12,
1000 epochs x 250 iterations), which OpenMind uses for every CNN baseline too; and the Primus MAE recipe
(``PRIMUS_MAE_RECIPE``). Trainer variants are ``dataclasses.replace`` of these; the ``_Nepochs`` variants replace
``num_epochs``, and the ``nnssl_*`` smoke-run variables still win over the recipe's schedule.
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from nnssl.lr_schedule import DECAYS
from nnssl.optimizer import OPTIMIZERS

PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class PretrainRecipe:
    peak_lr: float = 1e-2
    weight_decay: float = 3e-5
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    gradient_clip_norm: Optional[float] = 12.0  # None: no clipping
    precision: str = "bf16"  # autocast on CUDA; fp16 adds a GradScaler; the CPU always runs fp32
    max_nonfinite_losses_per_epoch: int = 20
    reconstruction_png_every: int = 50  # epochs
    save_every: int = 1  # epochs: pretraining epochs are long, resume from the last finished one
    optimizer: str = "sgd"  # sgd: Nesterov momentum 0.99; adamw: betas ``adamw_betas``
    adamw_betas: Tuple[float, float] = (0.9, 0.98)
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of the epochs, then ``decay``
    decay: str = "poly"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, not {self.decay!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), not {self.warmup_fraction}")
        if not self.peak_lr > 0 or self.weight_decay < 0:
            raise ValueError(f"peak_lr must be positive and weight_decay non-negative, not {self.peak_lr}, "
                             f"{self.weight_decay}")
        if self.gradient_clip_norm is not None and not self.gradient_clip_norm > 0:
            raise ValueError(f"gradient_clip_norm must be positive or None, not {self.gradient_clip_norm}")
        for name in ("num_epochs", "iterations_per_epoch", "val_iterations_per_epoch", "reconstruction_png_every",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_nonfinite_losses_per_epoch < 0:
            raise ValueError(f"max_nonfinite_losses_per_epoch must be >= 0, not {self.max_nonfinite_losses_per_epoch}")

    @property
    def uses_fp16(self) -> bool:
        return self.precision == "fp16"


PRETRAIN_RECIPE = PretrainRecipe()

# The reference's Primus MAE (BaseEvaMAETrainer, nnssl-behaviour.md section 6): AdamW 3e-4, weight decay 5e-2,
# betas (0.9, 0.98), clipping at 1, linear warm-up over 50 of 1000 epochs (5 %), then poly decay (the reference
# decays with poly, not cosine; cosine is ``decay="cosine"``).
PRIMUS_MAE_RECIPE = replace(PRETRAIN_RECIPE, peak_lr=3e-4, weight_decay=5e-2, gradient_clip_norm=1.0,
                            optimizer="adamw", adamw_betas=(0.9, 0.98), warmup_fraction=0.05, decay="poly")
