"""``nnssl_seed``: reproducible training for paired comparisons (same seed, same weights, same batches).

Seeds Python, numpy and torch in the training process before the network is built, and the augmentation workers.
nnU-Net's workers deliver batches in whatever order they finish (``NonDetMultiThreadedAugmenter``), so with a seed
they are replaced by batchgenerators' ordered ``MultiThreadedAugmenter`` whose workers each get their own seeded
numpy, torch and Python streams: the batch sequence then depends on the seed alone, for any ``nnUNet_n_proc_DA``.
Every DDP rank gets its own streams (seed, rank), so ranks still sample different cases.
"""

import itertools
import random
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

from nnssl.integration.environment import int_from_environment
from nnssl.integration.patching import replaced_attribute

SEED_VARIABLE = "nnssl_seed"


def seed_from_environment() -> Optional[int]:
    """The ``nnssl_seed`` value, or None when unset (nnU-Net's unseeded behaviour)."""
    return int_from_environment(SEED_VARIABLE, None, minimum=0)


def stream_seed(seed: int, *key: int) -> int:
    """A well-mixed 32-bit seed for the stream ``key`` of ``seed`` (rank, loader, worker)."""
    return int(np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1)[0])


# The streams nnssl_seed derives: the process's own is keyed (rank,), each augmentation worker's
# (rank, loader, worker), and every other stream (rank, purpose): keys of different shapes never collide.
DEVICE_AUGMENTATION_STREAM = 1
MASK_STREAM = 2


def seeded_stream(rank: int, purpose: int) -> Optional[int]:
    """The seed of stream ``purpose`` of ``rank`` under ``nnssl_seed``, or None when the variable is unset."""
    seed = seed_from_environment()
    return None if seed is None else stream_seed(seed, rank, purpose)


def seed_process(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SeededWorkerMixin:
    """Added to a data loader's class: the worker seeds torch and Python from its (already seeded) numpy stream."""

    def set_thread_id(self, thread_id: int) -> None:
        super().set_thread_id(thread_id)
        seed = int(np.random.randint(0, 2 ** 31 - 1))
        random.seed(seed)
        torch.manual_seed(seed)


def _with_seeded_workers(loader: object) -> object:
    cls = type(loader)
    if not issubclass(cls, _SeededWorkerMixin):
        loader.__class__ = type(f"Seeded{cls.__name__}", (_SeededWorkerMixin, cls), {})
    return loader


@contextmanager
def seeded_augmenters(seed: int, rank: int) -> Iterator[None]:
    """While active, nnU-Net's ``get_dataloaders`` builds ordered, seeded augmenters (one stream per loader)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    loader_index = itertools.count()  # training loader 0, validation loader 1: a stream each

    def ordered_augmenter(data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False,
                          wait_time=0.02):
        index = next(loader_index)
        worker_seeds = [stream_seed(seed, rank, index, worker) for worker in range(num_processes)]
        return MultiThreadedAugmenter(_with_seeded_workers(data_loader), transform, num_processes,
                                      num_cached_per_queue=max(2, -(-num_cached // num_processes)),
                                      seeds=worker_seeds, pin_memory=pin_memory, wait_time=wait_time)

    with replaced_attribute(trainer_module, "NonDetMultiThreadedAugmenter", ordered_augmenter):
        yield
