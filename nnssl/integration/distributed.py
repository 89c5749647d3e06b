"""torch.distributed set-up for ``nnssl_train`` under torchrun, and the places where released nnU-Net needs help.

nnU-Net 2.8.1 knows one DDP launch, ``-num_gpus`` (mp.spawn, NCCL, one node), and assumes that the global rank is the
CUDA device index: the trainer's ``__init__`` moves a DDP trainer to ``cuda:<rank>``, ``initialize`` wraps
``DDP(network, device_ids=[rank])`` and ``load_pretrained_weights`` maps the file to ``cuda:<rank>``. All three are
wrong on every node but the first and impossible on CPU (gloo). So ``nnssl_train`` initialises the process group from
torchrun's environment, moves the trainer to this process's local device right after construction
(``place_trainer_on``) and redirects the other two while it runs (``nnunet_on_local_device``). nnU-Net's rank-0 logic
is left alone: its ``local_rank`` is the global rank, which is what "only rank 0 writes" needs.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from nnssl.errors import UserError
from nnssl.integration.fork_safety import signal_on_parent_death
from nnssl.integration.patching import replaced_attribute

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(UserError, RuntimeError):
    """The launch environment or the plans do not allow a distributed run (message says what to change)."""


@dataclass(frozen=True)
class TorchrunEnvironment:
    """What torchrun tells every process it starts."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def _int_variable(environ: Mapping[str, str], name: str, default: Optional[str] = None) -> int:
    value = environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"Environment variable {name}={value!r} is not an integer; torchrun sets it, "
                                    f"launch with torchrun.") from None


def torchrun_environment(environ: Mapping[str, str] = os.environ) -> Optional[TorchrunEnvironment]:
    """The torchrun environment of this process; None when none of its variables is set (a plain launch)."""
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise DistributedSetupError(f"Incomplete torchrun environment: {', '.join(present)} set but "
                                    f"{', '.join(missing)} missing. Launch with `torchrun ... --no-python "
                                    f"nnssl_train ...` (it sets all of them), or unset {', '.join(present)} for a "
                                    f"single-process run.")
    env = TorchrunEnvironment(rank=_int_variable(environ, "RANK"), local_rank=_int_variable(environ, "LOCAL_RANK"),
                              world_size=_int_variable(environ, "WORLD_SIZE"),
                              local_world_size=_int_variable(environ, "LOCAL_WORLD_SIZE", "1"))
    if not (env.world_size >= 1 and 0 <= env.rank < env.world_size and 0 <= env.local_rank):
        raise DistributedSetupError(f"Inconsistent torchrun environment: RANK={env.rank}, LOCAL_RANK={env.local_rank}, "
                                    f"WORLD_SIZE={env.world_size}.")
    return env


def local_device(device_type: str, env: TorchrunEnvironment) -> torch.device:
    """``cuda:<LOCAL_RANK>`` (made the current CUDA device) or the CPU."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type != "cuda":
        raise DistributedSetupError(f"-device {device_type} is not supported under torchrun; use cuda (NCCL) or "
                                    f"cpu (gloo).")
    if not torch.cuda.is_available():
        raise DistributedSetupError("-device cuda, but this process sees no CUDA device; use -device cpu for a "
                                    "CPU (gloo) run.")
    visible = torch.cuda.device_count()
    if env.local_rank >= visible:
        raise DistributedSetupError(f"LOCAL_RANK {env.local_rank} needs GPU {env.local_rank}, but this process sees "
                                    f"{visible}: --nproc_per_node must not exceed the GPUs per node "
                                    f"(CUDA_VISIBLE_DEVICES).")
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    return device


def configure_threads(device_type: str, processes_on_node: int = 1) -> None:
    """nnU-Net's thread policy: on the CPU the node's cores (shared by its processes), one thread on a GPU."""
    if device_type == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // processes_on_node))
    elif device_type == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """The plans' batch is split evenly over the ranks (one optimiser step sees exactly the plans' batch)."""
    if global_batch_size % world_size:
        raise DistributedSetupError(f"The plans' batch size {global_batch_size} is not divisible by the world size "
                                    f"{world_size}: every rank trains on batch size / world size samples. Use a "
                                    f"world size that divides {global_batch_size}, or change batch_size in the plans "
                                    f"(nnssl_batch_size when planning).")
    return global_batch_size // world_size


def place_trainer_on(trainer: Any, device: torch.device) -> None:
    """Undo nnU-Net's ``cuda:<global rank>`` choice before ``initialize()`` builds anything on the device."""
    trainer.device = device
    if device.type != "cuda":
        trainer.grad_scaler = None  # nnU-Net (and nnssl) build a GradScaler only for CUDA


class _ModuleDeviceDDP(DistributedDataParallel):
    """DDP that takes the device from the wrapped module: ``device_ids=None`` (valid for one CUDA device and the
    CPU), whatever nnU-Net passes (its global rank)."""

    def __init__(self, module: nn.Module, device_ids: Any = None, output_device: Any = None, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)


class _NoProcessGroup:
    """``torch.distributed`` as nnU-Net's ``load_pretrained_weights`` sees it here. Its only use there is choosing
    ``cuda:<global rank>`` as the map location; without it the file loads as in a single-process run and
    ``load_state_dict`` copies the weights to the network's device."""

    @staticmethod
    def is_initialized() -> bool:
        return False


@contextmanager
def nnunet_on_local_device() -> Iterator[None]:
    """While active, nnU-Net's DDP wrapping and ``-pretrained_weights`` loading do not assume ``cuda:<rank>``."""
    import nnunetv2.run.load_pretrained_weights as pretrained_module
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    with replaced_attribute(trainer_module, "DDP", _ModuleDeviceDDP), \
            replaced_attribute(pretrained_module, "dist", _NoProcessGroup):
        yield


def attempt_store(env: TorchrunEnvironment, environ: Mapping[str, str] = os.environ) -> dist.Store:
    """torchrun's store (MASTER_ADDR:MASTER_PORT), with keys of this restart attempt only.

    torchrun (2.x, c10d rendezvous) serves the same store to every attempt of a job, and the default process group
    writes the same keys each time: after ``--max-restarts`` started new ranks, gloo read the previous attempt's
    addresses of the other ranks and failed to connect (or, while the dead rank's orphaned workers held its sockets,
    waited forever). The attempt number (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart."""
    store, _, _ = next(rendezvous("env://", rank=env.rank, world_size=env.world_size))
    return dist.PrefixStore(f"nnssl_attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


@contextmanager
def torchrun_session(env: TorchrunEnvironment, device_type: str) -> Iterator[torch.device]:
    """This process's local device, with the job's process group joined (rendezvous at MASTER_ADDR:MASTER_PORT) and
    nnU-Net's device assumptions redirected (``nnunet_on_local_device``); the group is left on exit.

    Everything built on the group (a trainer and its DDP reducer) must be released inside the session: a DDP module
    that outlives its group into interpreter shutdown aborts the process ("terminate called without an active
    exception"). Callers keep such objects local to a function called inside the session; the collection before
    leaving frees those caught in reference cycles."""
    device = local_device(device_type, env)
    configure_threads(device.type, env.local_world_size)
    # torchrun gone (killed, or dead of a SIGUSR1 it does not handle): SIGTERM, i.e. checkpoint and exit 75
    signal_on_parent_death(signal.SIGTERM, os.getppid())
    dist.init_process_group(backend_for(device), store=attempt_store(env), rank=env.rank, world_size=env.world_size)
    try:
        with nnunet_on_local_device():
            yield device
    finally:
        gc.collect()
        dist.destroy_process_group()


def gather_from_all_ranks(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group). Collective: every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
