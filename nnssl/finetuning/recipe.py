"""The fine-tuning recipe: every setting that decides how a downstream network is trained, in one frozen value.

Trainer variants are ``dataclasses.replace`` of ``DEFAULT_RECIPE``; the schedule, the optimizer and the log line are
all derived from the recipe, so no setting lives in two places.
"""

from dataclasses import dataclass, replace
from typing import Tuple

DECAYS = ("poly", "cosine")
OPTIMIZERS = ("sgd", "adamw")
TRANSFERABLE_PARTS = ("stem", "encoder", "decoder")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How to fine-tune: peak LR, warm-ups as fractions of the run's iterations, decay, freezing, what to transfer.

    Warm-ups are fractions so that a run of any length keeps the same shape: the S3D paper's 12.5k + 12.5k warm-up
    iterations of a 250k-iteration run are 5 % + 5 %.
    """

    peak_lr: float = 1e-2
    num_epochs: int = 1000  # nnU-Net's default length (x 250 iterations)
    deep_supervision: bool = True
    decoder_warmup_fraction: float = 0.05  # stage 1: fresh decoder alone, encoder frozen
    full_warmup_fraction: float = 0.05  # stage 2: whole network
    decay: str = "poly"
    freeze_encoder_throughout: bool = False
    transfer_parts: Tuple[str, ...] = ("stem", "encoder")
    optimizer: str = "sgd"
    spatial_only_augmentation: bool = False

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
        return replace(self, transfer_parts=(), decoder_warmup_fraction=0.0, freeze_encoder_throughout=False)


DEFAULT_RECIPE = FinetuneRecipe()
# The S3D paper's best full-length setting (Table 2): peak 1e-3, deep supervision off, 5 % + 5 % warm-ups.
PAPER_RECIPE = replace(DEFAULT_RECIPE, peak_lr=1e-3, deep_supervision=False)
