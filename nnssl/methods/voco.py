"""VoCo (volume contrastive learning) on a dna encoder: crop geometry, overlap targets, losses and projector head.

A patch is tiled into a grid of non-overlapping *base* crops; a few *target* crops are cut at random positions of
the same patch. The network must predict, for every target crop, how much of it lies in each base crop: the
similarity between a target's embedding and a base's embedding is trained towards their overlap fraction
(|target ∩ base| / crop volume; a target's fractions sum to 1 because the bases tile the patch). A regulariser
pushes the base embeddings of one patch apart. Only the encoder is transferred; the projector is discarded.

Crop cutting and per-crop augmentation run in nnU-Net's data pipeline (batchgeneratorsv2 transforms): the batch
arrives as ``data`` (B, n_base + n_target, C, *crop) and ``target`` (B, n_target, n_base) overlap fractions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from torch import nn

from nnssl.methods.encoder_features import (encoder_only_state_dict, encoder_state_dict, freeze_parts_without_gradient,
                                            is_primus_network, pooled_feature_width, pooled_features, pooled_stages)


# -log(1 - |overlap - similarity| + eps): eps keeps the logarithm finite when a prediction is completely wrong.
PREDICTION_LOG_EPS = 1e-6
PROJECTOR_DIM = 2048


# ------------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class VoCoGeometry:
    """A VoCo patch, its grid of base crops, and the number of random target crops per patch.

    The crop size is ``patch_size // base_crop_count`` and must tile the patch exactly (OpenMind: patch (256,256,64),
    grid (4,4,1), hence 16 base crops of 64^3, and 4 target crops).
    """

    patch_size: Tuple[int, int, int]
    base_crop_count: Tuple[int, int, int]
    target_crop_count: int = 4

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or len(self.base_crop_count) != 3:
            raise ValueError(f"VoCo needs a 3D patch and a 3D crop grid, got patch {self.patch_size} and grid "
                             f"{self.base_crop_count}.")
        if any(c < 1 or p % c for p, c in zip(self.patch_size, self.base_crop_count)):
            raise ValueError(f"The VoCo patch {self.patch_size} is not tiled exactly by a {self.base_crop_count} grid "
                             f"of base crops: every patch axis must be a positive multiple of its crop count.")
        if self.target_crop_count < 1:
            raise ValueError(f"VoCo needs at least one target crop, got {self.target_crop_count}.")

    @property
    def crop_size(self) -> Tuple[int, int, int]:
        return tuple(p // c for p, c in zip(self.patch_size, self.base_crop_count))

    @property
    def num_base_crops(self) -> int:
        return math.prod(self.base_crop_count)

    def base_crop_starts(self) -> np.ndarray:
        """(n_base, 3) corners of the base crops, ordered x (slowest), then y, then z (fastest), as the reference."""
        axes = [np.arange(n) * c for n, c in zip(self.base_crop_count, self.crop_size)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)

    def random_target_starts(self) -> np.ndarray:
        """(n_target, 3) corners drawn uniformly from every position where a crop fits inside the patch."""
        highs = [p - c + 1 for p, c in zip(self.patch_size, self.crop_size)]
        return np.stack([np.random.randint(0, h, size=self.target_crop_count) for h in highs], axis=-1)


def crop_overlaps(target_starts: np.ndarray, base_starts: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
    """(n_target, n_base) fraction of each target crop's volume that lies inside each base crop.

    Boxes are axis-aligned with equal sizes, so the intersection is a product of per-axis interval overlaps.
    """
    size = np.asarray(crop_size)
    low = np.maximum(target_starts[:, None, :], base_starts[None, :, :])
    high = np.minimum(target_starts[:, None, :] + size, base_starts[None, :, :] + size)
    intersection = np.clip(high - low, 0, None).prod(axis=-1)
    return (intersection / size.prod()).astype(np.float32)


def cut_crops(image: torch.Tensor, starts: np.ndarray, crop_size: Sequence[int]) -> torch.Tensor:
    """(n, C, *crop_size) copies of the crops of a (C, *patch) image at the given corners."""
    return torch.stack([image[:, x:x + crop_size[0], y:y + crop_size[1], z:z + crop_size[2]]
                        for x, y, z in starts.tolist()])


# ------------------------------------------------------------------------------------------------ data pipeline
class VoCoCropTransform(BasicTransform):
    """Turns a (C, *patch) sample into its base and target crops plus their overlap fractions.

    Output ``image``: (n_base + n_target, C, *crop), bases first; ``segmentation``: (n_target, n_base) float32
    overlaps (the label map is not needed by VoCo, so its slot carries the regression target through nnU-Net's loader).
    """

    def __init__(self, geometry: VoCoGeometry) -> None:
        super().__init__()
        self.geometry = geometry

    def get_parameters(self, **data_dict) -> dict:
        return {"target_starts": self.geometry.random_target_starts()}

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        if tuple(image.shape[1:]) != tuple(self.geometry.patch_size):
            raise ValueError(f"VoCo expects patches of {self.geometry.patch_size}, got {tuple(image.shape[1:])}.")
        base_starts = self.geometry.base_crop_starts()
        starts = np.concatenate([base_starts, params["target_starts"]])
        data_dict["image"] = cut_crops(image, starts, self.geometry.crop_size)
        overlaps = crop_overlaps(params["target_starts"], base_starts, self.geometry.crop_size)
        data_dict["segmentation"] = torch.from_numpy(overlaps)
        return data_dict


class PerCropTransform(BasicTransform):
    """Applies ``transform`` to every crop of a (n_crops, C, *crop) image independently (own random draws each)."""

    def __init__(self, transform: BasicTransform) -> None:
        super().__init__()
        self.transform = transform

    def apply(self, data_dict: dict, **params) -> dict:
        data_dict["image"] = torch.stack([self.transform(image=crop)["image"] for crop in data_dict["image"]])
        return data_dict


def voco_crop_augmentation(crop_size: Sequence[int]) -> BasicTransform:
    """The reference's per-crop train-time augmentation (nnssl-behaviour §5.2), with nnU-Net's parameterisation.

    Noise (std ~ U(0, 0.1), p 0.1), blur (sigma 0.5-1, p 0.2, 0.5 per channel), brightness x0.75-1.25 (p 0.15),
    contrast 0.75-1.25 (p 0.15), low resolution zoom 0.5-1 (p 0.1, 0.5 per channel), inverted and plain gamma
    0.7-1.5 (p 0.1 and 0.3), mirroring of each axis (p 0.5), and an in-plane (x, y) rot90 by 1-3 quarter turns
    (p 0.3; only when the crop is square in that plane, so every crop keeps its shape).
    """
    transforms = [
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ]
    if crop_size[0] == crop_size[1]:
        transforms.append(RandomTransform(Rot90Transform(num_axis_combinations=1, num_rot_per_combination=(1, 2, 3),
                                                         allowed_axes={0, 1}), apply_probability=0.3))
    return ComposeTransforms(transforms)


def voco_transforms(geometry: VoCoGeometry, augment: bool) -> BasicTransform:
    """Crops (and, for training, per-crop augmentation) for nnU-Net's data loader."""
    transforms = [VoCoCropTransform(geometry)]
    if augment:
        transforms.append(PerCropTransform(voco_crop_augmentation(geometry.crop_size)))
    return ComposeTransforms(transforms)


# ------------------------------------------------------------------------------------------------------- network
def feature_norm(num_features: int) -> nn.Module:
    """Per-sample normalisation over the feature dimension, no affine parameters.

    The reference writes ``InstanceNorm1d(2048, affine=False)`` and applies it to (N, 2048) embeddings; PyTorch
    reads a 2-D input as one unbatched (C=N, L=2048) sample, so each embedding is normalised over its own 2048
    features: LayerNorm without affine. That intent is written out here (same eps, 1e-5), without the warning
    and without depending on that reinterpretation of 2-D inputs.
    """
    return nn.LayerNorm(num_features, eps=1e-5, elementwise_affine=False)


class VoCoProjector(nn.Sequential):
    """Linear -> norm -> ReLU -> Linear -> norm -> ReLU -> Linear, 2048 wide (the reference's head)."""

    def __init__(self, in_features: int, dim: int = PROJECTOR_DIM) -> None:
        super().__init__(
            nn.Linear(in_features, dim), feature_norm(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim), feature_norm(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
        )


class VoCoModel(nn.Module):
    """A crop embedder (pooled features -> projector), optionally with a momentum (EMA) teacher.

    ``encoder`` is the part of the plans' network that a crop runs through, held as ``encoder``:
    * a dna U-Net's ``encoder`` (its globally pooled stage outputs, concatenated): the state-dict keys are the UNet's
      own ``encoder.*`` keys; the UNet's decoder is not kept (it would receive no gradient). (The reference builds an
      encoder-only network and then reads ``key_to_encoder`` from the encoder object, which dna 0.4.4 sets only on
      the UNet, so it fails there; the key strings live in nnssl's adaptation plan instead.)
    * a whole dna Primus (the mean of its EVA output tokens; the patch decoder is frozen): keys
      ``encoder.down_projection.*`` / ``encoder.eva.*``, the reference's VoCo-Eva layout.

    ``teacher_momentum`` m: a frozen copy of encoder and projector, ``teacher.*``, follows the student after every
    step (teacher <- m teacher + (1 - m) student) and embeds the base crops of the prediction loss, as the original
    VoCo does; it runs in eval mode (no drop path) and is saved with the model, so a resumed run continues it.
    """

    def __init__(self, encoder: nn.Module, projector_dim: int = PROJECTOR_DIM,
                 teacher_momentum: Optional[float] = None) -> None:
        super().__init__()
        self.is_primus = is_primus_network(encoder)
        if self.is_primus:
            freeze_parts_without_gradient(encoder)
            width = pooled_feature_width(encoder)
        elif getattr(encoder, "return_skips", False):
            width = sum(encoder.output_channels)
        else:
            raise ValueError("VoCo pools every encoder stage: the encoder must return all stage outputs "
                             "(dna's return_skips=True, as in a UNet's encoder).")
        self.encoder = encoder
        self.projector = VoCoProjector(width, projector_dim)
        self.teacher_momentum = teacher_momentum
        if teacher_momentum is not None:
            if not 0 <= teacher_momentum < 1:
                raise ValueError(f"The teacher momentum must lie in [0, 1), not {teacher_momentum}.")
            self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "projector": copy.deepcopy(self.projector)})
            self.teacher.requires_grad_(False)

    def pooled_features(self, crops: torch.Tensor, encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """(N, width): 1120-d for ResEnc-L (pooled stages), the embedding width for a Primus (pooled tokens)."""
        encoder = self.encoder if encoder is None else encoder
        return pooled_features(encoder, crops) if self.is_primus else pooled_stages(encoder, crops)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.projector(self.pooled_features(crops))

    @torch.no_grad()
    def teacher_embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        return self.teacher["projector"](self.pooled_features(crops, self.teacher["encoder"]))

    @torch.no_grad()
    def update_teacher(self) -> None:
        student = [*self.encoder.parameters(), *self.projector.parameters()]
        teacher = [*self.teacher["encoder"].parameters(), *self.teacher["projector"].parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - self.teacher_momentum)

    def train(self, mode: bool = True) -> "VoCoModel":
        super().train(mode)
        if self.teacher_momentum is not None:
            self.teacher.eval()
        return self

    def transferable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Stem and encoder under plain dna keys (U-Net: ``encoder.*``; Primus: ``down_projection.*``, ``eva.*``)."""
        return encoder_state_dict(self.encoder) if self.is_primus else encoder_only_state_dict(self)


# ---------------------------------------------------------------------------------------------------------- losses
def positive_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n_a, n_b) relu(cosine similarity) between every row of a (B, n_a, D) and of b (B, n_b, D), in float32."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return torch.relu(a @ b.transpose(1, 2))


def voco_prediction_loss(target_embeddings: torch.Tensor, base_embeddings: torch.Tensor,
                         overlaps: torch.Tensor) -> torch.Tensor:
    """Similarities of targets to (detached) bases trained towards the overlap fractions.

    Positive term: overlap-weighted -log(1 - |overlap - similarity| + 1e-6), averaged with the overlaps as weights
    over the whole batch. Negative term: mean squared similarity over the zero-overlap pairs. The bases are
    detached, as in the reference: the bases act as fixed class prototypes for this term and only the targets move.
    """
    similarity = positive_cosine(target_embeddings, base_embeddings.detach())
    overlaps = overlaps.float()
    log_term = -torch.log(1.0 - (overlaps - similarity).abs() + PREDICTION_LOG_EPS)
    positive = (log_term * overlaps).sum() / overlaps.sum()  # each target row sums to 1
    disjoint = (overlaps == 0).float()
    negative = (similarity.square() * disjoint).sum() / disjoint.sum().clamp_min(1.0)
    return positive + negative


def voco_regularisation_loss(base_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean relu(cosine) over all pairs i < j of one patch's base embeddings (batch mean); bases get gradients."""
    n_base = base_embeddings.shape[1]
    if n_base < 2:
        raise ValueError("The VoCo regularisation needs at least two base crops per patch.")
    similarity = positive_cosine(base_embeddings, base_embeddings)
    rows, cols = torch.triu_indices(n_base, n_base, offset=1, device=similarity.device)
    return similarity[:, rows, cols].mean()
