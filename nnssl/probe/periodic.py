"""The probe inside a pretraining run: every N epochs, on rank 0, without disturbing the run.

Off unless ``nnssl_probe_dataset`` names a labeled dataset (its ID). At the end of every ``nnssl_probe_every``-th epoch
(and the last) rank 0 copies the run's transferable weights into a probe network of its own and runs the pretrained
arm of ``nnssl_probe`` with ``nnssl_probe_iterations`` head updates; the random-encoder floor is run once, at the
first probe. The pretraining is left as it was: the global random streams (Python, numpy, torch CPU and CUDA) are
captured before and restored after, the optimizer and the live network are not touched (the weights are cloned),
and the other ranks wait at a barrier. The labeled dataset is planned and preprocessed for the run (plans
``nnsslProbe_<pretraining plans>``, recorded as planned for the run's ``checkpoint_final.pth``) at the start of
training, unless already prepared. The record (Dice per epoch, floor, seconds) goes into the training log, the
checkpoints (``nnssl_probe``) and ``progress.png``.
"""

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, Mapping, Optional

import torch

from nnssl.integration.environment import int_from_environment, positive_int_from_environment
from nnssl.integration.run_state import capture_random_streams, restore_random_streams
from nnssl.probe.data import ProbeData, prepared_probe_data
from nnssl.probe.run import pretrained_arm, random_arm
from nnssl.probe.settings import ProbeSettings

DATASET_VARIABLE = "nnssl_probe_dataset"
EVERY_VARIABLE = "nnssl_probe_every"
ITERATIONS_VARIABLE = "nnssl_probe_iterations"
DEFAULT_EVERY = 50
CHECKPOINT_KEY = "nnssl_probe"


@dataclass
class ProbeRecord:
    """What the periodic probe measured so far (stored in the checkpoints as a plain dict)."""

    dataset: str
    plans: str
    settings: dict
    split: str
    random_dice: Optional[float] = None
    dice: Dict[int, float] = field(default_factory=dict)
    seconds: Dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "ProbeRecord":
        return cls(**dict(values))


@dataclass(frozen=True)
class PeriodicProbeConfig:
    dataset_id: int
    every: int
    settings: ProbeSettings

    @classmethod
    def from_environment(cls) -> Optional["PeriodicProbeConfig"]:
        dataset_id = int_from_environment(DATASET_VARIABLE, None, minimum=0)
        if dataset_id is None:
            return None
        iterations = positive_int_from_environment(ITERATIONS_VARIABLE, ProbeSettings.iterations)
        return cls(dataset_id, positive_int_from_environment(EVERY_VARIABLE, DEFAULT_EVERY),
                   ProbeSettings(iterations=iterations))

    def due(self, epoch: int, num_epochs: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch == num_epochs - 1

    def describe(self) -> str:
        return f"dataset {self.dataset_id} every {self.every} epochs (and the last), {self.settings.describe()}"


def probe_plans_name(pretraining_plans_name: str) -> str:
    return f"nnsslProbe_{pretraining_plans_name}"


@contextmanager
def random_streams_kept(device: torch.device, generators: Mapping[str, torch.Generator]) -> Iterator[None]:
    """The process's random streams (Python, numpy, torch, the device's) and ``generators`` as they were before."""
    streams = capture_random_streams(device, generators)
    try:
        yield
    finally:
        restore_random_streams(streams, device, generators)


class PeriodicProbe:
    """The probe of one pretraining run (rank 0 only): prepared once, then run at the due epochs."""

    def __init__(self, config: PeriodicProbeConfig, pretraining_plans_name: str):
        self.config = config
        self.plans_name = probe_plans_name(pretraining_plans_name)
        self.data: Optional[ProbeData] = None

    def prepare(self, checkpoint_path: str, checkpoint: dict, say: Callable[[str], None], device: torch.device,
                generators: Mapping[str, torch.Generator]) -> ProbeRecord:
        with random_streams_kept(device, generators):
            self.data = prepared_probe_data(self.config.dataset_id, self.plans_name, checkpoint_path, checkpoint,
                                            say)
        return ProbeRecord(dataset=self.data.dataset_name, plans=self.plans_name, settings=asdict(self.config.settings),
                           split=self.data.split.describe())

    def run(self, record: ProbeRecord, epoch: int, network_weights: Dict[str, torch.Tensor], adaptation_plan: dict,
            device: torch.device, generators: Mapping[str, torch.Generator]) -> None:
        """Probe ``network_weights`` (cloned) into ``record`` at ``epoch``; the process's random streams (and
        ``generators``) are put back afterwards."""
        start = time.perf_counter()
        with random_streams_kept(device, generators):
            weights = {key: value.detach().clone() for key, value in network_weights.items()}
            arm, _ = pretrained_arm(self.data, weights, adaptation_plan, self.config.settings, device,
                                    f"epoch {epoch} weights")
            if record.random_dice is None:
                record.random_dice = random_arm(self.data, self.config.settings, device).dice
        record.dice[epoch] = arm.dice
        record.seconds[epoch] = time.perf_counter() - start
