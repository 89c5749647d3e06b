"""Learning-rate shapes shared by pretraining and fine-tuning: linear warm-up, then poly (0.9) or cosine decay to 0.

Stage lengths are fractions of a run (at least one step when the fraction is positive), so a smoke run has the same
shape as a full one; a run too short for its warm-ups gets them cut to fit (``fitted_warmups``) and says so.
Pretraining steps per epoch (as nnU-Net's schedulers), fine-tuning per iteration.
"""

import math
from typing import Sequence, Tuple

DECAYS = ("poly", "cosine")
POLY_EXPONENT = 0.9


def stage_length(fraction: float, total_steps: int) -> int:
    return max(1, round(fraction * total_steps)) if fraction > 0 else 0


def fitted_warmups(warmups: Sequence[int], total_steps: int) -> Tuple[int, ...]:
    """The warm-up stage lengths, in order, cut so that at least one decay step remains.

    Runs long enough for the recipe get its lengths unchanged. A smoke run shorter than that keeps the earlier
    stages first (fine-tuning's frozen-encoder warm-up before the whole-network one), down to decay alone.
    """
    budget, fitted = max(0, total_steps - 1), []
    for length in warmups:
        fitted.append(min(length, budget))
        budget -= fitted[-1]
    return tuple(fitted)


def shrink_note(unit: str, total_steps: int, recipe: Sequence[int], fitted: Sequence[int]) -> str:
    """The clause a schedule's log line carries when ``fitted_warmups`` cut the recipe's warm-ups ('' otherwise)."""
    if tuple(recipe) == tuple(fitted):
        return ""
    as_text = " + ".join
    return (f" (shrunk to fit a {total_steps}-{unit} run: the recipe's warm-up lengths in {unit}s, "
            f"{as_text(map(str, recipe))}, leave no {unit} to decay in; now {as_text(map(str, fitted))})")


def linear_warmup(peak: float, step: int, length: int) -> float:
    """Step ``step`` (0-based) of a ``length``-step ramp that reaches ``peak`` at its last step (nnU-Net's
    ``Lin_incr_LRScheduler``)."""
    return peak * (step + 1) / length


def decayed(peak: float, progress: float, decay: str) -> float:
    """``peak`` decayed to 0 over ``progress`` in [0, 1)."""
    if decay == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress) ** POLY_EXPONENT


def warmup_then_decay(peak: float, step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """One linear warm-up of ``warmup_steps`` steps, then decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return linear_warmup(peak, step, warmup_steps)
    return decayed(peak, (step - warmup_steps) / (total_steps - warmup_steps), decay)


class EpochLRScheduler:
    """Stands in for nnU-Net's per-epoch scheduler (``step(epoch)`` at every epoch start): warm-up, then decay."""

    def __init__(self, optimizer, peak: float, warmup_fraction: float, decay: str, num_epochs: int):
        self.optimizer = optimizer
        self.peak = peak
        self.decay = decay
        self.num_epochs = num_epochs
        self.recipe_warmup_epochs = stage_length(warmup_fraction, num_epochs)
        (self.warmup_epochs,) = fitted_warmups([self.recipe_warmup_epochs], num_epochs)

    def lr(self, epoch: int) -> float:
        return warmup_then_decay(self.peak, epoch, self.warmup_epochs, self.num_epochs, self.decay)

    def step(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(epoch)

    def describe(self) -> str:
        return (f"linear warm-up {self.warmup_epochs} epochs to {self.peak}, then {self.decay} decay to epoch "
                f"{self.num_epochs}" + shrink_note("epoch", self.num_epochs, [self.recipe_warmup_epochs],
                                                   [self.warmup_epochs]))
