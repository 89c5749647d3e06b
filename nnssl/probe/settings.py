"""The probe's budget (no heavy imports: ``nnssl_probe --help`` shows the defaults)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeSettings:
    """``iterations`` head updates of ``batch_size`` patches, AdamW at ``learning_rate``, everything seeded by
    ``seed``."""

    iterations: int = 300
    batch_size: int = 2
    learning_rate: float = 1e-3
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.iterations} iterations x batch {self.batch_size}, AdamW lr {self.learning_rate}, seed "
                f"{self.seed}")
