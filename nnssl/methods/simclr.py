"""SimCLR on a plans' network (dna U-Net or Primus): two overlapping views per patch, embedded and contrasted.

Each sample is a SimCLR patch from which two equal crops (the *views*) are cut at random positions that overlap by at
least ``min_overlap`` of the crop on every axis (so by at least ``min_overlap``^3 of the volume); each view is
augmented on its own. Every view is embedded (``pooled_features`` of the network -> projector) and NT-Xent pulls the
two views of one sample together against all other views of the (global) batch (``nnssl.methods.contrastive``).
Only the stem and encoder are transferred; the projector is discarded.

Cutting and augmentation run in nnU-Net's data pipeline (batchgeneratorsv2 transforms, VoCo's crop cutting and
per-crop augmentation): the batch arrives as ``data`` (B, 2, C, *crop).

The reference (nnssl's SimCLRTrainer) cuts two such *pairs* per image by default, so pairs of one image are each
other's negatives; here every sample gives one pair and the batch supplies the negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from torch import nn
from torch.distributed.nn.functional import all_reduce

from nnssl.methods.encoder_features import freeze_parts_without_gradient, pooled_feature_width, pooled_features
from nnssl.methods.voco import PerCropTransform, cut_crops, voco_crop_augmentation

NUM_VIEWS = 2
PROJECTOR_HIDDEN, PROJECTOR_OUTPUT = 2048, 128


@dataclass(frozen=True)
class SimCLRGeometry:
    """The patch the loader cuts, the size of the two views cut from it, and their minimum overlap per axis.

    OpenMind's reference: patch (192,192,64), views 64^3, overlap >= 0.5 per axis.
    """

    patch_size: Tuple[int, int, int]
    crop_size: Tuple[int, int, int]
    min_overlap: float = 0.5

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or len(self.crop_size) != 3:
            raise ValueError(f"SimCLR needs a 3D patch and 3D views, got {self.patch_size} and {self.crop_size}.")
        if any(c < 1 or c > p for p, c in zip(self.patch_size, self.crop_size)):
            raise ValueError(f"The SimCLR views {self.crop_size} must fit into the patch {self.patch_size}.")
        if not 0 <= self.min_overlap <= 1:
            raise ValueError(f"The minimum view overlap is a fraction in [0, 1], not {self.min_overlap}.")

    @property
    def max_shift(self) -> Tuple[int, ...]:
        """The largest offset between the two views per axis that keeps ``min_overlap`` of the crop."""
        return tuple(int(np.floor(c * (1 - self.min_overlap))) for c in self.crop_size)

    def random_view_starts(self) -> np.ndarray:
        """(2, 3) corners: the first view uniform in the patch, the second within ``max_shift`` of it (and inside)."""
        first = np.array([np.random.randint(0, p - c + 1) for p, c in zip(self.patch_size, self.crop_size)])
        low = np.maximum(first - self.max_shift, 0)
        high = np.minimum(first + self.max_shift, np.subtract(self.patch_size, self.crop_size))
        second = np.array([np.random.randint(lo, hi + 1) for lo, hi in zip(low, high)])
        return np.stack([first, second])


class SimCLRViewTransform(BasicTransform):
    """Turns a (C, *patch) sample into its two views, ``image`` (2, C, *crop)."""

    def __init__(self, geometry: SimCLRGeometry) -> None:
        super().__init__()
        self.geometry = geometry

    def get_parameters(self, **data_dict) -> dict:
        return {"starts": self.geometry.random_view_starts()}

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        if tuple(image.shape[1:]) != tuple(self.geometry.patch_size):
            raise ValueError(f"SimCLR expects patches of {self.geometry.patch_size}, got {tuple(image.shape[1:])}.")
        data_dict["image"] = cut_crops(image, params["starts"], self.geometry.crop_size)
        return data_dict


def simclr_transforms(geometry: SimCLRGeometry, augment: bool) -> BasicTransform:
    """The two views (each augmented on its own for training, as the reference: VoCo's per-crop augmentation)."""
    transforms = [SimCLRViewTransform(geometry)]
    if augment:
        transforms.append(PerCropTransform(voco_crop_augmentation(geometry.crop_size)))
    return ComposeTransforms(transforms)


class GlobalBatchNorm1d(nn.Module):
    """Batch normalisation over the global batch (every DDP rank), with batch statistics in training and validation.

    Global, because with a batch of one sample per rank a per-rank norm of its two views maps them to opposite signs;
    SimCLR uses a global norm for this reason. nnU-Net turns torch's BatchNorm layers into SyncBatchNorm under DDP,
    which runs on GPUs only; this layer all-reduces its sums (gradients included) on any backend, gloo too. No
    running statistics: the head is discarded after pretraining, and they lag the quickly moving features of a short
    run (measured with torch's BatchNorm: validation loss 0.06 -> 2.2 while the training loss fell).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        count = torch.tensor([float(x.shape[0])], device=x.device)
        sums = torch.cat([x32.sum(dim=0), x32.square().sum(dim=0), count])  # one collective per step, not two
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = all_reduce(sums)
        features, count = x.shape[1], sums[-1]
        mean = sums[:features] / count
        variance = (sums[features:2 * features] / count - mean.square()).clamp_min(0.0)
        return ((x32 - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias).to(x.dtype)


class SimCLRProjector(nn.Sequential):
    """SimCLR's projection head: Linear -> BatchNorm -> ReLU -> Linear, 2048 hidden, 128 out (Chen et al. 2020).

    Not the reference's choice (it reuses VoCo's head, whose norms act per sample): at initialisation the pooled
    features of different crops share one dominant direction (cosine 0.999 between all views of a tiny ResEnc), a
    per-sample norm keeps it, and NT-Xent then starts at its chance value with gradients of about 0.01, which the
    SGD recipe barely moves (measured: 40 steps, loss 1.0986 -> 1.0982). The batch norm removes the shared
    direction (cosine 0.35 at the start) and the same steps bring the loss to 0.05 (documentation/pretraining.md).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__(nn.Linear(in_features, PROJECTOR_HIDDEN), GlobalBatchNorm1d(PROJECTOR_HIDDEN),
                         nn.ReLU(inplace=True), nn.Linear(PROJECTOR_HIDDEN, PROJECTOR_OUTPUT))


class SimCLRModel(nn.Module):
    """The plans' network (held whole, so checkpoints keep its keys) whose pooled encoder output feeds SimCLR's
    projection head. The parts an embedding never runs through (a U-Net's decoder, a Primus's patch decoder) are
    frozen.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        freeze_parts_without_gradient(network)
        self.network = network
        self.projector = SimCLRProjector(pooled_feature_width(network))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.projector(pooled_features(self.network, views))
