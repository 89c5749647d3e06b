"""The fine-tuning recipe: every setting that decides how a downstream network is trained, in one frozen value.

Trainer variants are ``dataclasses.replace`` of ``DEFAULT_RECIPE``; the schedule, the optimizer and the log line are
all derived from the recipe, so no setting lives in two places.
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from nnssl.lr_schedule import DECAYS
from nnssl.optimizer import OPTIMIZERS

TRANSFERABLE_PARTS = ("stem", "encoder", "decoder")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How to fine-tune: peak LR, warm-ups as fractions of the run's iterations, decay, freezing, what to transfer.

    Warm-ups are fractions so that a run of any length keeps the same shape: the S3D paper's 12.5k + 12.5k warm-up
    iterations of a 250k-iteration run are 5 % + 5 %.
    """

    peak_lr: float = 1e-2
    num_epochs: int = 1000  # nnU-Net's default length (x 250 iterations)
    deep_supervision: bool = False  # off: paired runs with a pretrained encoder (README, "Why this default")
    decoder_warmup_fraction: float = 0.05  # stage 1: fresh decoder alone, encoder frozen
    full_warmup_fraction: float = 0.05  # stage 2: whole network
    decay: str = "poly"
    freeze_encoder_throughout: bool = False
    transfer_parts: Tuple[str, ...] = ("stem", "encoder")
    optimizer: str = "sgd"  # sgd: Nesterov momentum 0.99; adamw: ``adamw_betas``, ``amsgrad``
    spatial_only_augmentation: bool = False
    weight_decay: float = 3e-5  # nnU-Net's
    adamw_betas: Tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = True
    gradient_clip_norm: float = 12.0  # nnU-Net's
    scratch_peak_lr: Optional[float] = None  # the peak LR of ``from_scratch()`` (None: the same peak)

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, not {self.decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        unknown = set(self.transfer_parts) - set(TRANSFERABLE_PARTS)
        if unknown:
            raise ValueError(f"transfer_parts may name {TRANSFERABLE_PARTS}, not {sorted(unknown)}")
        if not self.peak_lr > 0:
            raise ValueError(f"peak_lr must be positive, not {self.peak_lr}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be at least 1, not {self.num_epochs}")
        for name in ("decoder_warmup_fraction", "full_warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), not {getattr(self, name)}")
        if self.decoder_warmup_fraction + self.full_warmup_fraction >= 1:
            raise ValueError("the warm-up fractions leave no decay stage: their sum must be below 1")
        if self.weight_decay < 0 or not self.gradient_clip_norm > 0:
            raise ValueError(f"weight_decay must be >= 0 and gradient_clip_norm positive, not {self.weight_decay}, "
                             f"{self.gradient_clip_norm}")
        if self.spatial_only_augmentation and self.deep_supervision:
            raise ValueError("spatial-only augmentation is implemented without deep supervision")

    @property
    def loads_pretrained(self) -> bool:
        return bool(self.transfer_parts)

    @property
    def freezes_encoder_in_decoder_warmup(self) -> bool:
        """A decoder-only warm-up exists only when a pretrained encoder is there to protect."""
        return self.loads_pretrained and "decoder" not in self.transfer_parts and self.decoder_warmup_fraction > 0

    def from_scratch(self) -> "FinetuneRecipe":
        """The same recipe from random initialisation: nothing transferred, hence no decoder-only warm-up."""
        return replace(self, transfer_parts=(), decoder_warmup_fraction=0.0, freeze_encoder_throughout=False,
                       peak_lr=self.scratch_peak_lr or self.peak_lr, scratch_peak_lr=None)


DEFAULT_RECIPE = FinetuneRecipe()
# The S3D paper's best full-length setting (Table 2): peak 1e-3, deep supervision off, 5 % + 5 % warm-ups.
PAPER_RECIPE = replace(DEFAULT_RECIPE, peak_lr=1e-3, deep_supervision=False)
# Primus: nnU-Net's Primus schedule (nnUNet_Primus_M_Trainer from scratch, master's PretrainedTrainer_Primus for
# pretrained weights): AdamW, betas (0.9, 0.98), no amsgrad, weight decay 5e-2, clipping at 1, one whole-network
# linear warm-up over 5 % (50 of 1000 epochs), then poly; peak 1e-4 pretrained, 3e-4 from scratch; no deep
# supervision (a Primus has one output).
PRIMUS_RECIPE = replace(DEFAULT_RECIPE, peak_lr=1e-4, scratch_peak_lr=3e-4, deep_supervision=False,
                        decoder_warmup_fraction=0.0, full_warmup_fraction=0.05, optimizer="adamw",
                        adamw_betas=(0.9, 0.98), amsgrad=False, weight_decay=5e-2, gradient_clip_norm=1.0)
