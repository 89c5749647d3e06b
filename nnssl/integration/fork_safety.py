"""Processes forked from a training process (nnU-Net's augmentation workers) are made safe for the parent: they run
torch with one thread, die with the parent, and leave preemption signals to it.

* One torch thread. PyTorch's CPU kernels (ATen's ``parallel_for``, MKL, oneDNN) run on GNU OpenMP, which is not
  fork-safe: once the parent has run a parallel region, a forked child's first parallel region waits forever for pool
  threads that ``fork()`` did not copy. ``nnUNetv2_train -device cpu`` gives torch one thread per core, so the
  parent's pool is live as soon as it has run one large enough op. nnU-Net's default augmenter sets one torch thread
  in each worker; batchgenerators' ordered ``MultiThreadedAugmenter``, which ``nnssl_seed`` uses, does not, and its
  first ``SpatialTransform`` (a batched ``torch.matmul``) then hangs at 0 % CPU.
* Death with the parent (Linux ``PR_SET_PDEATHSIG``). A worker whose trainer was killed (``kill -9``, a node's OOM
  killer) used to live on as an orphan, holding the sockets it inherited from the trainer: the dead rank's
  ``torch.distributed`` connections. torchrun's restarted ranks then waited forever in ``init_process_group``.
* Preemption signals stay the trainer's. SLURM signals every process of a job step: a worker killed by ``SIGUSR1``
  would end the run before the trainer could checkpoint, so workers ignore it; ``SIGTERM`` keeps its default action
  (batchgenerators stops its workers with it).
"""

import ctypes
import os
import signal
import sys

import torch

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_registered = False
_parent_pid = os.getpid()


def _remember_parent() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def signal_on_parent_death(sig: int, parent_pid: int) -> None:
    """Have Linux send ``sig`` to this process when its parent ``parent_pid`` dies (at once if it already has;
    nothing on other systems)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def _prepare_child() -> None:
    # set_num_threads only sets OpenMP's and MKL's thread-count variables: safe before the child ran any torch op
    torch.set_num_threads(1)
    signal_on_parent_death(signal.SIGKILL, _parent_pid)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def prepare_forked_children() -> None:
    """Register (once per process) the fork handlers that make every forked child single-threaded, mortal with its
    parent and deaf to the parent's preemption signals."""
    global _registered
    if not _registered:
        os.register_at_fork(before=_remember_parent, after_in_child=_prepare_child)
        _registered = True
