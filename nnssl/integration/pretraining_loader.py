"""nnU-Net's training data loader, trimmed for pretraining: the region map is read only when the loss uses it.

Why: an augmentation worker of the S3D pipeline spent about 40 % of its time reading, cropping and resampling the
placeholder label map of ingested data, which the default S3D loss never reads. ``PretrainingDataLoader`` samples
cases and crop boxes exactly as ``nnUNetDataLoader`` (its ``get_indices`` and ``get_bbox``), then

* reads the image crop straight into the batch tensor when there are no CPU transforms (no padded copy first;
  blosc2 decompresses only the chunks the box touches; the batch is allocated in shared memory, where a worker
  process must put it anyway), and
* reads the region map only with ``read_region_map=True``; otherwise the transforms see no ``segmentation`` and the
  batch's ``target`` is whatever they put there (Models Genesis: the clean patch; VoCo: overlaps), or None;
* skips a case it cannot read (another case takes its place) and reports it in the batch under
  ``nnssl.integration.unreadable_cases.BATCH_KEY``: the trainer decides whether the run goes on;
* with ``case_subjects``, draws cases subject-balanced (``nnssl.integration.subject_sampling``) through nnU-Net's
  own ``sampling_probabilities``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnssl.integration.subject_sampling import CaseSubjects
from nnssl.integration.unreadable_cases import BATCH_KEY, UnreadableCaseError, unreadable_report

IMAGE_PAD_VALUE = 0
REGION_PAD_VALUE = -1  # as nnU-Net's loader: outside the image


def shared_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor allocated in shared memory (fresh shared memory reads as zeros).

    A batch that a worker process hands to the trainer must be in shared memory; allocated there, it is not copied
    on the way (116 MiB per 312^3 read patch), and zero padding needs no fill.
    """
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def crop_into(out: torch.Tensor, array, bbox: Sequence[Sequence[int]], pad_value: float,
              zeroed: bool = False) -> None:
    """Write the box ``bbox`` (half-open, spatial axes) of a (C, *spatial) array into ``out``, padding outside
    (``zeroed``: ``out`` holds zeros already, so zero padding is there)."""
    spatial = array.shape[1:]
    source, target = [slice(None)], [slice(None)]
    for (low, high), size in zip(bbox, spatial):
        start, stop = max(low, 0), min(high, size)
        source.append(slice(start, stop))
        target.append(slice(start - low, stop - low))
    padded = any(s.stop - s.start < out.shape[i + 1] for i, s in enumerate(target[1:]))
    if padded and not (zeroed and pad_value == 0):
        out.fill_(pad_value)
    if all(s.stop > s.start for s in source[1:]):
        out[tuple(target)] = torch.from_numpy(np.ascontiguousarray(array[tuple(source)])).to(out.dtype)


class PretrainingDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` without the region map unless ``read_region_map`` (3D, no cascade)."""

    def __init__(self, *args, read_region_map: bool = True, shared_batches: bool = True,
                 case_subjects: Optional[CaseSubjects] = None, **kwargs) -> None:
        """``shared_batches``: batches of read patches in shared memory (for worker processes to hand over; a
        training without workers does not need shared memory). ``case_subjects``: draw subject-balanced."""
        super().__init__(*args, **kwargs)
        if case_subjects is not None:  # aligned with this loader's cases, which np.random.choice draws from
            self.sampling_probabilities = case_subjects.probabilities(self.indices)
        if self.patch_size_was_2d:
            raise ValueError("PretrainingDataLoader reads 3D patches only.")
        self.read_region_map = read_region_map
        self.shared_batches = shared_batches
        self.unreadable: Set[str] = set()

    def _zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return shared_zeros(shape, dtype) if self.shared_batches else torch.zeros(tuple(shape), dtype=dtype)

    def _case_and_box(self, key: str, force_fg: bool) -> Tuple[object, object, List[Tuple[int, int]]]:
        """The case's image and region map (blosc2 arrays, nothing decompressed yet) and the crop box to read."""
        data, seg, seg_prev, properties = self._data.load_case(key)
        if seg_prev is not None:
            raise ValueError("PretrainingDataLoader does not support cascades.")
        lows, highs = self.get_bbox(data.shape[1:], force_fg, properties["class_locations"])
        return data, seg, list(zip(lows, highs))

    def generate_train_batch(self) -> dict:
        keys: List[str] = self.get_indices()
        batch: dict = {"data": None, "target": None}
        reports: List[Tuple[str, str]] = []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                keys[j] = self._read_readable_sample(j, key, batch, reports)
        return {"data": batch["data"], "target": batch["target"], "keys": keys, BATCH_KEY: reports}

    def _read_readable_sample(self, j: int, key: str, batch: dict, reports: List[Tuple[str, str]]) -> str:
        """Sample ``j`` read from ``key`` or, where a case cannot be read, from another case; returns the case read.
        A case that failed once is never read again by this loader; ``reports`` gets (case, problem) when it fails."""
        while True:
            if key not in self.unreadable:
                try:
                    self._read_sample(j, key, batch)
                    return key
                except Exception as error:  # a truncated or corrupt file: whatever blosc2 or pickle raise
                    reports.append(unreadable_report(self._data.source_folder, key, error))
                    self.unreadable.add(key)
                    for tensor in (batch["data"], batch["target"]):
                        if tensor is not None:
                            tensor[j].zero_()  # a partial read must not stay in the zero-padded batch
            readable = [case for case in self.indices if case not in self.unreadable]
            if not readable:
                raise UnreadableCaseError(f"None of the {len(self.indices)} cases of this loader can be read: "
                                          f"{'; '.join(problem for _, problem in reports)}")
            key = readable[np.random.randint(len(readable))]

    def _read_sample(self, j: int, key: str, batch: dict) -> None:
        data, seg, bbox = self._case_and_box(key, self.get_do_oversample(j))
        if self.transforms is None:  # the read patch is the sample: straight into the zeroed batch
            if batch["data"] is None:
                batch["data"] = self._zeros((self.batch_size, data.shape[0], *self.patch_size), torch.float32)
                if self.read_region_map:
                    batch["target"] = self._zeros((self.batch_size, seg.shape[0], *self.patch_size), torch.int16)
            crop_into(batch["data"][j], data, bbox, IMAGE_PAD_VALUE, zeroed=True)
            if batch["target"] is not None:
                crop_into(batch["target"][j], seg, bbox, REGION_PAD_VALUE)
            return
        sample = {"image": torch.empty((data.shape[0], *self.patch_size), dtype=torch.float32)}
        crop_into(sample["image"], data, bbox, IMAGE_PAD_VALUE)
        if self.read_region_map:
            sample["segmentation"] = torch.empty((seg.shape[0], *self.patch_size), dtype=torch.int16)
            crop_into(sample["segmentation"], seg, bbox, REGION_PAD_VALUE)
        sample = self.transforms(**sample)
        if batch["data"] is None:
            batch["data"] = torch.empty((self.batch_size, *sample["image"].shape), dtype=torch.float32)
        batch["data"][j] = sample["image"]
        target = sample.get("segmentation")
        if target is not None:
            if batch["target"] is None:
                batch["target"] = torch.empty((self.batch_size, *target.shape), dtype=target.dtype)
            batch["target"][j] = target
