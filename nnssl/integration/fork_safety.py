"""Processes forked from a training process run torch with one thread, so that they never touch the parent's
OpenMP thread pool.

PyTorch's CPU kernels (ATen's ``parallel_for``, MKL, oneDNN) run on GNU OpenMP, which is not fork-safe: once the
parent has run a parallel region, a forked child's first parallel region waits forever for pool threads that
``fork()`` did not copy. ``nnUNetv2_train -device cpu`` gives torch one thread per core, so the parent's pool is live
as soon as it has run one large enough op (loading pretrained weights, building the network, a validation step).
nnU-Net's default augmenter (``NonDetMultiThreadedAugmenter``) sets one torch thread in each worker before it works;
batchgenerators' ordered ``MultiThreadedAugmenter``, which ``nnssl_seed`` uses, does not, and its first
``SpatialTransform`` (a batched ``torch.matmul``) then hangs at 0 % CPU. An after-fork handler fixes this for every
child, whatever forks it: augmentation workers are meant to be single-threaded anyway (one process per core).
"""

import os

import torch

_registered = False


def _one_torch_thread_in_child() -> None:
    # only sets OpenMP's and MKL's thread-count variables: safe before the child has run any torch op
    torch.set_num_threads(1)


def single_threaded_forked_children() -> None:
    """Register (once per process) the after-fork handler that gives every forked child one torch thread."""
    global _registered
    if not _registered:
        os.register_at_fork(after_in_child=_one_torch_thread_in_child)
        _registered = True
