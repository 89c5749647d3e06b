"""Where a training stands, as a checkpoint keeps it (``nnssl_run_state``), so that a resumed run is the same run.

nnU-Net's checkpoint holds weights, optimizer, grad scaler, logger and the next epoch. A run resumed from it alone
repeats nothing but is not the run it would have been: the process's random streams restart, the seeded augmentation
workers start their streams again, and a run stopped inside an epoch loses that epoch's iterations. The run state adds
the position (epoch and iterations done in it), the batches each loader has delivered, every rank's random streams
(Python, numpy, torch; the device's; named ``torch.Generator`` s such as the device augmentation's) and losses of the
unfinished epoch, the unreadable cases skipped so far, and whether the run stopped at a preemption request.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

RUN_STATE_KEY = "nnssl_run_state"


@dataclass
class Position:
    """The next iteration to run: ``iteration`` training iterations of ``epoch`` are done (0: the epoch starts)."""

    epoch: int
    iteration: int = 0


@dataclass
class RankState:
    """What differs between the ranks of a run."""

    random_streams: Dict[str, Any]
    epoch_outputs: List[Any] = field(default_factory=list)


@dataclass
class RunState:
    position: Position
    batches_drawn: Dict[str, int]
    ranks: List[RankState]
    unreadable_cases: Dict[str, str] = field(default_factory=dict)
    preempted_by: Optional[str] = None  # the signal that stopped the run, when it stopped at a preemption request

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "RunState":
        return cls(position=Position(**state["position"]), batches_drawn=dict(state["batches_drawn"]),
                   ranks=[RankState(**rank) for rank in state["ranks"]],
                   unreadable_cases=dict(state.get("unreadable_cases", {})), preempted_by=state.get("preempted_by"))

    def rank(self, rank: int) -> Optional[RankState]:
        """This rank's saved state; None for a rank the saved run did not have (the world grew)."""
        return self.ranks[rank] if rank < len(self.ranks) else None


def run_state_of(checkpoint: Mapping[str, Any]) -> Optional[RunState]:
    """The run state of a checkpoint; None for checkpoints written without one (by nnU-Net or older nnssl)."""
    state = checkpoint.get(RUN_STATE_KEY)
    return None if state is None else RunState.from_dict(state)


def capture_random_streams(device: torch.device, generators: Mapping[str, torch.Generator]) -> Dict[str, Any]:
    """This process's global random streams (and the device's), and those of ``generators``, as tensors and plain
    Python values (a checkpoint stays loadable with ``torch.load(..., weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    streams: Dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        streams["cuda"] = torch.cuda.get_rng_state(device)
    streams["generators"] = {name: generator.get_state() for name, generator in generators.items()}
    return streams


def restore_random_streams(streams: Mapping[str, Any], device: torch.device,
                           generators: Mapping[str, torch.Generator]) -> None:
    version, internal, gauss = streams["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = streams["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(streams["torch"].cpu())
    if device.type == "cuda" and "cuda" in streams:
        torch.cuda.set_rng_state(streams["cuda"].cpu(), device)
    for name, state in streams.get("generators", {}).items():
        if name in generators:
            generators[name].set_state(state.cpu())


def to_plain(value: Any) -> Any:
    """``value`` (a train step's outputs) with numpy arrays and scalars as tensors and Python numbers."""
    if isinstance(value, np.ndarray):
        return {"ndarray": torch.from_numpy(np.array(value, order="C")), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


def from_plain(value: Any) -> Any:
    """The inverse of ``to_plain``."""
    if isinstance(value, dict):
        if set(value) == {"ndarray", "dtype"}:
            return value["ndarray"].numpy().astype(np.dtype(value["dtype"]))
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(item) for item in value)
    return value
