"""``nnssl_seed``: reproducible training for paired comparisons (same seed, same weights, same batches).

Seeds Python, numpy and torch in the training process before the network is built, and the augmentation workers.
nnU-Net's workers deliver batches in whatever order they finish (``NonDetMultiThreadedAugmenter``), so with a seed
they are replaced by batchgenerators' ordered ``MultiThreadedAugmenter``, and every batch is drawn from streams seeded
by its index: the batch sequence then depends on the seed alone, for any ``nnUNet_n_proc_DA``, and a resumed run
continues it where it stopped. Every DDP rank gets its own streams (seed, rank), so ranks still sample different
cases.
"""

import itertools
import random
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from nnssl.integration.environment import int_from_environment
from nnssl.integration.patching import replaced_attribute

SEED_VARIABLE = "nnssl_seed"


def seed_from_environment() -> Optional[int]:
    """The ``nnssl_seed`` value, or None when unset (nnU-Net's unseeded behaviour)."""
    return int_from_environment(SEED_VARIABLE, None, minimum=0)


def stream_seed(seed: int, *key: int) -> int:
    """A well-mixed 32-bit seed for the stream ``key`` of ``seed`` (rank, loader, worker)."""
    return int(np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1)[0])


# The streams nnssl_seed derives: the process's own is keyed (rank,), each augmentation batch's
# (rank, loader, batch index), and every other stream (rank, purpose): keys of different shapes never collide.
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


class _PerBatchSeededLoader:
    """Added to a data loader's class: before each batch, numpy, torch and Python are seeded from (seed, rank, loader,
    batch index), so that batch ``i`` is the same whichever worker makes it and whenever, a resumed run included.

    A worker makes batches ``first + thread_id``, ``first + thread_id + stride``, ...: batchgenerators' ordered
    augmenter takes them round-robin from its workers. In the training process itself (no workers) the process's
    own streams are put back after the batch."""

    nnssl_stream: Tuple[int, int, int] = (0, 0, 0)  # (seed, rank, loader)
    nnssl_first_batch = 0
    nnssl_batch_stride = 1
    _nnssl_next_batch: Optional[int] = None

    def generate_train_batch(self):
        if self._nnssl_next_batch is None:
            self._nnssl_next_batch = self.nnssl_first_batch + self.thread_id
        index, self._nnssl_next_batch = self._nnssl_next_batch, self._nnssl_next_batch + self.nnssl_batch_stride
        seed, rank, loader = self.nnssl_stream
        with _process_streams_kept():
            seed_process(stream_seed(seed, rank, loader, index))
            return super().generate_train_batch()


@contextmanager
def _process_streams_kept() -> Iterator[None]:
    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)


def _per_batch_seeded(loader: object, stream: Tuple[int, int, int], first_batch: int, stride: int) -> object:
    cls = type(loader)
    if not issubclass(cls, _PerBatchSeededLoader):
        loader.__class__ = type(f"Seeded{cls.__name__}", (_PerBatchSeededLoader, cls), {})
    loader.nnssl_stream, loader.nnssl_first_batch, loader.nnssl_batch_stride = stream, first_batch, stride
    return loader


@contextmanager
def seeded_augmenters(seed: int, rank: int, first_batches: Sequence[int] = (0, 0)) -> Iterator[None]:
    """While active, nnU-Net's ``get_dataloaders`` builds ordered augmenters whose batches are seeded per batch index
    (training loader 0, validation loader 1), starting at ``first_batches`` (a resumed run: where it stopped)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    loader_index = itertools.count()

    def seeded(data_loader, num_processes: int) -> object:
        index = next(loader_index)
        return _per_batch_seeded(data_loader, (seed, rank, index), first_batches[index], max(1, num_processes))

    def ordered_augmenter(data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False,
                          wait_time=0.02):
        return MultiThreadedAugmenter(seeded(data_loader, num_processes), transform, num_processes,
                                      num_cached_per_queue=max(2, -(-num_cached // num_processes)),
                                      pin_memory=pin_memory, wait_time=wait_time)

    def in_process_augmenter(data_loader, transform):
        return SingleThreadedAugmenter(seeded(data_loader, 0), transform)

    with replaced_attribute(trainer_module, "NonDetMultiThreadedAugmenter", ordered_augmenter), \
            replaced_attribute(trainer_module, "SingleThreadedAugmenter", in_process_augmenter):
        yield
