"""Fine-tuning learning-rate schedules, per iteration (S3D paper, Table 2 and Table 8).

Default (the paper's best): stage 1 warms up the fresh decoder alone (encoder frozen) with a linear ramp to the
peak LR, stage 2 warms up the whole network with a second linear ramp, stage 3 decays from the peak (poly 0.9, or
cosine). Freezing is expressed as a zero learning rate for the encoder parameter group, which leaves the weights
bit-identical and stays correct under DDP and torch.compile (no parameter ever stops receiving gradients).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FinetuneSchedule:
    peak_lr: float
    num_epochs: int
    iterations_per_epoch: int
    decoder_warmup_epochs: int = 50
    full_warmup_epochs: int = 50
    decay: str = "poly"  # "poly" (exponent 0.9) or "cosine"
    freeze_encoder_throughout: bool = False
    freeze_encoder_in_decoder_warmup: bool = True
    poly_exponent: float = 0.9
    default_num_epochs: int = 1000

    def __post_init__(self):
        if self.decay not in ("poly", "cosine"):
            raise ValueError(f"decay must be 'poly' or 'cosine', not {self.decay!r}")
        if self.decoder_warmup_epochs + self.full_warmup_epochs >= self.num_epochs:
            raise ValueError(f"warm-ups of {self.decoder_warmup_epochs} + {self.full_warmup_epochs} epochs leave no "
                             f"training stage in {self.num_epochs} epochs; use fitted_to()")

    @classmethod
    def fitted_to(cls, num_epochs: int, **settings) -> "FinetuneSchedule":
        """The schedule for ``num_epochs``; warm-ups that would not fit are scaled by num_epochs / 1000 (min 1).

        Shorter variants such as ``_150ep`` keep the full 50 + 50 warm-ups (paper, Table 8); only smoke runs with a
        handful of epochs get scaled warm-ups.
        """
        decoder = settings.pop("decoder_warmup_epochs", 50)
        full = settings.pop("full_warmup_epochs", 50)
        if decoder + full >= num_epochs:
            scale = num_epochs / settings.get("default_num_epochs", 1000)
            decoder = max(1, round(decoder * scale)) if decoder else 0
            full = max(1, round(full * scale)) if full else 0
            while decoder + full >= num_epochs and (decoder or full):
                if decoder >= full and decoder:
                    decoder -= 1
                else:
                    full -= 1
        return cls(num_epochs=num_epochs, decoder_warmup_epochs=decoder, full_warmup_epochs=full, **settings)

    def stage(self, epoch: int) -> int:
        if epoch < self.decoder_warmup_epochs:
            return 1
        if epoch < self.decoder_warmup_epochs + self.full_warmup_epochs:
            return 2
        return 3

    def lr(self, epoch: int, iteration: int) -> float:
        """The LR of the (decoder) parameter group at ``iteration`` of ``epoch``."""
        ipe = self.iterations_per_epoch
        stage = self.stage(epoch)
        if stage == 1:
            step, length = epoch * ipe + iteration, self.decoder_warmup_epochs * ipe
            return self.peak_lr * (step + 1) / length
        if stage == 2:
            step = (epoch - self.decoder_warmup_epochs) * ipe + iteration
            return self.peak_lr * (step + 1) / (self.full_warmup_epochs * ipe)
        start = self.decoder_warmup_epochs + self.full_warmup_epochs
        progress = ((epoch - start) * ipe + iteration) / ((self.num_epochs - start) * ipe)
        if self.decay == "cosine":
            return self.peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak_lr * (1 - progress) ** self.poly_exponent

    def encoder_lr(self, epoch: int, iteration: int) -> float:
        """Zero while the encoder is frozen (stage 1, or always for frozen-encoder fine-tuning)."""
        if self.freeze_encoder_throughout or (self.freeze_encoder_in_decoder_warmup and self.stage(epoch) == 1):
            return 0.0
        return self.lr(epoch, iteration)
