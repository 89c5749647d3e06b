"""Fine-tuning learning rates per iteration, derived from a ``FinetuneRecipe`` and the run's length.

Stage 1 warms up the fresh decoder alone (encoder frozen) with a linear ramp to the peak LR, stage 2 warms up the
whole network with a second linear ramp, stage 3 decays from the peak (poly 0.9, or cosine) to zero at the last
iteration. The stages are fractions of the run's total iterations (at least one iteration each when the fraction
is positive), so a 100-iteration smoke run has the same shape as the paper's 250k-iteration run; a run too short for
both warm-ups and a decay step gets them cut to fit (the frozen-encoder warm-up kept first) and says so. Freezing is
a zero learning rate for the encoder parameter group: the weights stay bit-identical, and it stays correct under DDP and
torch.compile (no parameter ever stops receiving gradients).
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

from nnssl.finetuning.recipe import FinetuneRecipe
from nnssl.lr_schedule import decayed, fitted_warmups, linear_warmup, shrink_note, stage_length


@dataclass(frozen=True)
class FinetuneSchedule:
    recipe: FinetuneRecipe
    total_iterations: int
    decoder_warmup_iterations: int = field(init=False)
    full_warmup_iterations: int = field(init=False)

    def __post_init__(self) -> None:
        fitted = fitted_warmups(self.recipe_warmups, self.total_iterations)
        object.__setattr__(self, "decoder_warmup_iterations", fitted[0])
        object.__setattr__(self, "full_warmup_iterations", fitted[1])

    @property
    def recipe_warmups(self) -> Tuple[int, int]:
        """The recipe's (decoder, whole-network) warm-up lengths for this run, before any fitting."""
        return (stage_length(self.recipe.decoder_warmup_fraction, self.total_iterations),
                stage_length(self.recipe.full_warmup_fraction, self.total_iterations))

    @property
    def unfreeze_step(self) -> Optional[int]:
        """The iteration at which a frozen encoder starts to learn (its optimizer state must be reset there)."""
        if (self.recipe.freeze_encoder_throughout or not self.recipe.freezes_encoder_in_decoder_warmup
                or not self.decoder_warmup_iterations):
            return None
        return self.decoder_warmup_iterations

    def stage(self, step: int) -> int:
        if step < self.decoder_warmup_iterations:
            return 1
        if step < self.decoder_warmup_iterations + self.full_warmup_iterations:
            return 2
        return 3

    def lr(self, step: int) -> float:
        """The LR of the decoder parameter group at global iteration ``step`` (0-based)."""
        peak = self.recipe.peak_lr
        stage = self.stage(step)
        if stage == 1:
            return linear_warmup(peak, step, self.decoder_warmup_iterations)
        if stage == 2:
            return linear_warmup(peak, step - self.decoder_warmup_iterations, self.full_warmup_iterations)
        start = self.decoder_warmup_iterations + self.full_warmup_iterations
        return decayed(peak, (step - start) / (self.total_iterations - start), self.recipe.decay)

    def encoder_lr(self, step: int) -> float:
        """Zero while the encoder is frozen (stage 1 with a pretrained encoder, or always when frozen throughout)."""
        if self.recipe.freeze_encoder_throughout or (self.recipe.freezes_encoder_in_decoder_warmup
                                                     and self.stage(step) == 1):
            return 0.0
        return self.lr(step)

    def describe(self) -> str:
        """One log line that says what this run really does."""
        recipe, parts = self.recipe, []
        if self.decoder_warmup_iterations:
            frozen = "encoder frozen" if recipe.freezes_encoder_in_decoder_warmup else "encoder learning"
            parts.append(f"decoder warm-up {self.decoder_warmup_iterations} iterations ({frozen})")
        if self.full_warmup_iterations:
            parts.append(f"whole-network warm-up {self.full_warmup_iterations} iterations")
        parts.append(f"{recipe.decay} decay to iteration {self.total_iterations}")
        start = ("random initialisation" if not recipe.loads_pretrained
                 else "pretrained " + " + ".join(recipe.transfer_parts))
        return (f"{start}; " + ", then ".join(parts) + f"; peak LR {recipe.peak_lr}, {recipe.optimizer}, deep "
                f"supervision {'on' if recipe.deep_supervision else 'off'}"
                + ("; encoder frozen throughout" if recipe.freeze_encoder_throughout else "")
                + shrink_note("iteration", self.total_iterations, self.recipe_warmups,
                              (self.decoder_warmup_iterations, self.full_warmup_iterations)))
