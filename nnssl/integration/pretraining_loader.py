"""nnU-Net's training data loader, trimmed for pretraining: the region map is read only when the loss uses it.

Why: an augmentation worker of the S3D pipeline spent about 40 % of its time reading, cropping and resampling the
placeholder label map of ingested data, which the default S3D loss never reads. ``PretrainingDataLoader`` samples
cases and crop boxes exactly as ``nnUNetDataLoader`` (its ``get_indices`` and ``get_bbox``), then

* reads the image crop straight into the batch tensor when there are no CPU transforms (no padded copy first;
  blosc2 decompresses only the chunks the box touches; the batch is allocated in shared memory, where a worker
  process must put it anyway), and
* reads the region map only with ``read_region_map=True``; otherwise the transforms see no ``segmentation`` and the
  batch's ``target`` is whatever they put there (Models Genesis: the clean patch; VoCo: overlaps), or None.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

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

    def __init__(self, *args, read_region_map: bool = True, shared_batches: bool = True, **kwargs) -> None:
        """``shared_batches``: batches of read patches in shared memory (for worker processes to hand over; a
        training without workers does not need shared memory)."""
        super().__init__(*args, **kwargs)
        if self.patch_size_was_2d:
            raise ValueError("PretrainingDataLoader reads 3D patches only.")
        self.read_region_map = read_region_map
        self.shared_batches = shared_batches

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
        data_all = seg_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, bbox = self._case_and_box(key, self.get_do_oversample(j))
                if self.transforms is None:  # the read patch is the sample: straight into the zeroed batch
                    if data_all is None:
                        data_all = self._zeros((self.batch_size, data.shape[0], *self.patch_size), torch.float32)
                        if self.read_region_map:
                            seg_all = self._zeros((self.batch_size, seg.shape[0], *self.patch_size), torch.int16)
                    crop_into(data_all[j], data, bbox, IMAGE_PAD_VALUE, zeroed=True)
                    if seg_all is not None:
                        crop_into(seg_all[j], seg, bbox, REGION_PAD_VALUE)
                    continue
                sample = {"image": torch.empty((data.shape[0], *self.patch_size), dtype=torch.float32)}
                crop_into(sample["image"], data, bbox, IMAGE_PAD_VALUE)
                if self.read_region_map:
                    sample["segmentation"] = torch.empty((seg.shape[0], *self.patch_size), dtype=torch.int16)
                    crop_into(sample["segmentation"], seg, bbox, REGION_PAD_VALUE)
                sample = self.transforms(**sample)
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *sample["image"].shape), dtype=torch.float32)
                data_all[j] = sample["image"]
                target = sample.get("segmentation")
                if target is not None:
                    if seg_all is None:
                        seg_all = torch.empty((self.batch_size, *target.shape), dtype=target.dtype)
                    seg_all[j] = target
        return {"data": data_all, "target": seg_all, "keys": keys}
