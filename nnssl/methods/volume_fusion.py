"""VolumeFusion: fuse two patches box by box and let the network segment the fusion coefficient of every voxel.

Per output sample (reference §5.3): 10..39 boxes, each with a size drawn per axis from [8, int(0.625 * S)] (so the
boxes scale with the patch), a uniform start inside the patch and a class k in 0..K-1 with coefficient
``linspace(0, 1, K)[k]``. Boxes are painted in order (later ones overwrite earlier ones) onto a label map that starts
at 0, the pure-background class. The input is ``a * foreground + (1 - a) * background`` with ``a`` the coefficient
of the voxel's label, the target is the label.

Fusion needs two patches per output sample, but nnU-Net's data loader applies transforms to one sample at a time.
``VolumeFusionTransform`` therefore works on a whole loaded batch of 2B patches (first half foregrounds, second half
backgrounds) and runs in the train step, on the training device: painting at most 39 boxes is cheap there, and the
per-sample intensity augmentations before fusion still run in nnU-Net's augmentation workers.
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss



@dataclass(frozen=True)
class VolumeFusionConfig:
    num_classes: int = 5
    min_boxes: int = 10
    max_boxes: int = 39  # inclusive: the reference's randint(10, 40)
    min_box_size: int = 8
    max_box_fraction: float = 0.625  # 100 voxels at the reference's 160^3 patch


@dataclass(frozen=True)
class FusionBoxes:
    """Boxes in painting order: ``starts`` and ``sizes`` (M, D) in voxels, fusion ``classes`` (M,)."""

    starts: np.ndarray
    sizes: np.ndarray
    classes: np.ndarray


def fusion_coefficients(num_classes: int) -> torch.Tensor:
    """Coefficient of each class: class 0 is pure background, class K-1 pure foreground."""
    return torch.linspace(0.0, 1.0, num_classes)


def box_size_range(spatial_shape: Tuple[int, ...], config: VolumeFusionConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive per-axis size bounds [8, int(0.625 S)], kept inside the patch for very small patches."""
    shape = np.asarray(spatial_shape)
    low = np.minimum(config.min_box_size, shape)
    high = np.maximum(low, (config.max_box_fraction * shape).astype(int))
    return low, high


def sample_fusion_boxes(spatial_shape: Tuple[int, ...], rng: np.random.Generator,
                        config: VolumeFusionConfig) -> FusionBoxes:
    count = int(rng.integers(config.min_boxes, config.max_boxes + 1))
    low, high = box_size_range(spatial_shape, config)
    sizes = rng.integers(low, high + 1, size=(count, len(spatial_shape)))
    starts = rng.integers(0, np.asarray(spatial_shape) - sizes + 1)
    classes = rng.integers(0, config.num_classes, size=count)
    return FusionBoxes(starts, sizes, classes)


def paint_labels(spatial_shape: Tuple[int, ...], boxes: FusionBoxes, device: torch.device) -> torch.Tensor:
    """Label map (int64, ``spatial_shape``): 0 outside all boxes, else the class of the last box covering a voxel."""
    labels = torch.zeros(spatial_shape, dtype=torch.long, device=device)
    for start, size, label in zip(boxes.starts.tolist(), boxes.sizes.tolist(), boxes.classes.tolist()):
        labels[tuple(slice(s, s + n) for s, n in zip(start, size))] = label
    return labels


def fuse(foreground: torch.Tensor, background: torch.Tensor, labels: torch.Tensor,
         coefficients: torch.Tensor) -> torch.Tensor:
    """``a * foreground + (1 - a) * background`` with ``a = coefficients[labels]`` broadcast over channels."""
    alpha = coefficients.to(foreground.device, foreground.dtype)[labels]
    return alpha * foreground + (1 - alpha) * background


class VolumeFusionTransform(BasicTransform):
    """Batch-level fusion: ``image`` (2B, C, *S) becomes the fused (B, C, *S), ``segmentation`` the (B, 1, *S) labels.

    The first B patches are the foregrounds, the last B the backgrounds; each pair gets its own boxes.
    """

    def __init__(self, config: VolumeFusionConfig, rng: np.random.Generator):
        super().__init__()
        self.config = config
        self.rng = rng
        self.coefficients = fusion_coefficients(config.num_classes)

    def apply(self, data_dict: dict, **params) -> dict:
        images = data_dict["image"]
        if images.shape[0] % 2:
            raise ValueError(f"VolumeFusion needs an even number of patches (foregrounds, then backgrounds), got "
                             f"{images.shape[0]}.")
        foreground, background = images.chunk(2)
        spatial_shape = tuple(images.shape[2:])
        labels = torch.stack([paint_labels(spatial_shape, sample_fusion_boxes(spatial_shape, self.rng, self.config),
                                           images.device) for _ in range(foreground.shape[0])])[:, None]
        data_dict["image"] = fuse(foreground, background, labels, self.coefficients)
        data_dict["segmentation"] = labels
        return data_dict


def volume_fusion_loss(is_ddp: bool = False) -> DC_and_CE_loss:
    """The reference's Dice + CE (it returns -Dice + CE, so the loss can be negative)."""
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": True, "ddp": is_ddp}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
