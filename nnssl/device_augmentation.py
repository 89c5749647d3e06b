"""Spatial augmentation of a whole batch on the training device: rotation, scaling and mirroring in one resampling.

Why: batchgeneratorsv2's ``SpatialTransform`` resamples every patch (and its region map, label by label) in the CPU
augmentation workers, which at 160^3 costs most of a worker's time. Here the workers only read and crop the larger
pre-rotation patch; the trainer draws the parameters, builds one sampling grid per resampled patch
(``affine_grid``) and resamples the batch with one ``grid_sample`` on its device.

Same distribution and geometry as nnssl's CPU pipeline (``nnssl.augmentation.spatial_transforms``, bgv2 semantics):
per sample, rotation with p 0.2 (then one angle per axis, each U(rotation)), scaling with p 0.2 (one factor
U(scaling) for all axes), the affine ``Rz @ Ry @ Rx @ S`` maps output offsets from the patch centre to source
offsets from the centre of the read patch (trilinear, zeros outside, ``align_corners=False``); patches that are
neither rotated nor scaled are cropped at the centre without interpolation, as bgv2 does; then every allowed mirror
axis is flipped with p 0.5. Region maps go through the same transform (per-label linear scores, argmax; voxels
outside the image are label -1, then 0). Randomness comes from one seeded ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnssl.augmentation import PRETRAINING_P_ROTATION, PRETRAINING_P_SCALING, PRETRAINING_ROTATION, PRETRAINING_SCALING

OUTSIDE_LABEL = -1  # what the loader pads region maps with; becomes 0 after the transform, as RemoveLabelTansform


@dataclass(frozen=True)
class SpatialAugmentationConfig:
    """Probabilities and ranges of nnssl's pretraining ``SpatialTransform`` + ``MirrorTransform``."""

    p_rotation: float = PRETRAINING_P_ROTATION
    rotation: Tuple[float, float] = PRETRAINING_ROTATION  # radians, drawn per axis
    p_scaling: float = PRETRAINING_P_SCALING
    scaling: Tuple[float, float] = PRETRAINING_SCALING  # one factor for all axes (>1: a larger region, smaller objects)
    mirror_axes: Tuple[int, ...] = (0, 1, 2)
    p_mirror: float = 0.5


@dataclass(frozen=True)
class SpatialParameters:
    """Per sample: ``matrices`` (B, 3, 3) output offset -> source offset (array axis order, mirroring included)
    and ``resampled`` (B,) whether the sample is rotated or scaled (else: a plain centre crop, possibly flipped)."""

    matrices: torch.Tensor
    resampled: torch.Tensor
    mirrored: torch.Tensor  # (B, 3) bool


def _uniform(low: float, high: float, shape: Tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def rotation_scaling_matrices(angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) ``Rz(a2) @ Ry(a1) @ Rx(a0) @ diag(scales)``, bgv2's ``create_affine_matrix_3d`` for a batch."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(*rows):
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    rx = matrix((one, zero, zero), (zero, cos[:, 0], -sin[:, 0]), (zero, sin[:, 0], cos[:, 0]))
    ry = matrix((cos[:, 1], zero, sin[:, 1]), (zero, one, zero), (-sin[:, 1], zero, cos[:, 1]))
    rz = matrix((cos[:, 2], -sin[:, 2], zero), (sin[:, 2], cos[:, 2], zero), (zero, zero, one))
    return rz @ ry @ rx @ torch.diag_embed(scales)


def sample_spatial_parameters(batch_size: int, config: SpatialAugmentationConfig,
                              generator: torch.Generator) -> SpatialParameters:
    """Draw rotation, scaling and mirroring for ``batch_size`` samples (float64 on the CPU: a few numbers)."""
    rotate = torch.rand(batch_size, generator=generator, dtype=torch.float64) < config.p_rotation
    scale = torch.rand(batch_size, generator=generator, dtype=torch.float64) < config.p_scaling
    angles = _uniform(*config.rotation, (batch_size, 3), generator) * rotate[:, None]
    factors = torch.where(scale, _uniform(*config.scaling, (batch_size,), generator), 1.0)
    mirrored = torch.zeros(batch_size, 3, dtype=torch.bool)
    flips = torch.rand(batch_size, len(config.mirror_axes), generator=generator) < config.p_mirror
    mirrored[:, list(config.mirror_axes)] = flips
    signs = 1.0 - 2.0 * mirrored.double()
    matrices = rotation_scaling_matrices(angles, factors[:, None].expand(-1, 3)) @ torch.diag_embed(signs)
    return SpatialParameters(matrices, rotate | scale, mirrored)


def _centre_crop(volume: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """bgv2's crop for untransformed patches: centre floor(S / 2), start centre - patch // 2."""
    starts = [s // 2 - p // 2 for s, p in zip(volume.shape[-3:], patch_size)]
    return volume[(..., *(slice(a, a + p) for a, p in zip(starts, patch_size)))]


def sampling_grid(matrices: torch.Tensor, source_size: Sequence[int], patch_size: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """``grid_sample`` grids (B, *patch, 3) for source offset = matrix @ output offset (both from the centres).

    ``affine_grid`` works in normalised coordinates (offset / (size / 2) with ``align_corners=False``) and in
    reversed axis order (x = last array axis), so the pixel-space matrix is rescaled and its axes reversed.
    """
    to_source = torch.diag(2.0 / torch.tensor(source_size, dtype=torch.float64))
    from_patch = torch.diag(torch.tensor(patch_size, dtype=torch.float64) / 2.0)
    normalised = (to_source @ matrices @ from_patch).flip(-1).flip(-2)
    theta = torch.cat([normalised, torch.zeros(len(matrices), 3, 1, dtype=torch.float64)], dim=-1)
    return F.affine_grid(theta.to(device, torch.float32), [len(matrices), 1, *patch_size], align_corners=False)


def _resample_regions(regions: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-label linear scores through ``grid``, argmax (ties to the lower label); outside the image is -1."""
    labels = torch.unique(torch.cat([regions.flatten(), regions.new_tensor([OUTSIDE_LABEL])]))
    best = winner = None
    for label in labels.tolist():
        indicator = (regions == label).float()
        if label == OUTSIDE_LABEL:  # 1 outside the image: sample (indicator - 1) with zero padding, add 1 back
            score = F.grid_sample(indicator - 1, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False) + 1
        else:
            score = F.grid_sample(indicator, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if best is None:
            best, winner = score, torch.full_like(score, label, dtype=regions.dtype)
        else:
            better = score > best
            best = torch.where(better, score, best)
            winner = torch.where(better, torch.full_like(winner, label), winner)
    return winner


def apply_spatial_augmentation(images: torch.Tensor, parameters: SpatialParameters, patch_size: Sequence[int],
                               regions: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, C, *read) images (and (B, 1, *read) region maps) -> (B, C, *patch_size) augmented patches.

    Resampled samples share one batched ``grid_sample``; the others are centre crops; mirroring is part of the
    resampled samples' matrices and a flip for the cropped ones. Region maps come back with -1 replaced by 0.
    """
    patch_size = tuple(int(p) for p in patch_size)
    out = images.new_empty((images.shape[0], images.shape[1], *patch_size))
    out_regions = None if regions is None else regions.new_empty((regions.shape[0], 1, *patch_size))
    resampled = parameters.resampled.tolist()
    for index, flag in enumerate(resampled):
        if flag:
            continue
        axes = [a + 1 for a in torch.nonzero(parameters.mirrored[index]).flatten().tolist()]
        out[index] = torch.flip(_centre_crop(images[index], patch_size), axes)
        if regions is not None:
            out_regions[index] = torch.flip(_centre_crop(regions[index], patch_size), axes)
    chosen = [i for i, flag in enumerate(resampled) if flag]
    if chosen:
        index = torch.tensor(chosen, device=images.device)
        grid = sampling_grid(parameters.matrices[chosen], images.shape[2:], patch_size, images.device)
        out[index] = F.grid_sample(images[index].float(), grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False).to(out.dtype)
        if regions is not None:
            out_regions[index] = _resample_regions(regions[index], grid)
    if out_regions is not None:
        out_regions[out_regions == OUTSIDE_LABEL] = 0
    return out, out_regions


class DeviceSpatialAugmentation:
    """The pretraining spatial augmentation of a batch on its device, drawn from its own seeded generator."""

    def __init__(self, patch_size: Sequence[int], config: SpatialAugmentationConfig, seed: Optional[int]) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.config = config
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # fresh entropy: unseeded runs (and their DDP ranks) draw independently
        else:
            self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor, regions: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Augmented (B, C, *patch) images (and regions); in float32 even inside the train step's bf16 autocast,
        where ``affine_grid``'s matrix product would otherwise round sampling coordinates to bf16 (~0.5 voxel)."""
        parameters = sample_spatial_parameters(images.shape[0], self.config, self.generator)
        with torch.autocast(images.device.type, enabled=False):
            return apply_spatial_augmentation(images, parameters, self.patch_size, regions)
