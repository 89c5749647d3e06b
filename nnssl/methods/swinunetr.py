"""SwinUNETR-style pretraining (Tang et al., CVPR 2022) of the plans' network: rotation, inpainting, contrast.

Every sample becomes two views of the same crop, each rotated by a random multiple of 90 degrees in the (x, y) plane
and cut out: random boxes filled with noise, then random boxes filled with the other view's content (real tissue in
the wrong place, so the network cannot just spot noise). From the cut-out views the network predicts the rotation
(4 classes, cross entropy), reconstructs the rotated, uncut view (L1 over every voxel) and embeds each view for a
contrastive term between the two views of a sample (NT-Xent, negatives from the whole global batch). Loss weights
1, 1, 1 as the reference (MIC-DKFZ/nnssl's ``SwinUNETRTrainer``), which follows MONAI's implementation: its second
cut-out pass pastes another sample of the batch, which a per-sample pipeline cannot reach, hence the other view.

The views are built in nnU-Net's data pipeline (``SwinUNETRViewTransform``): ``data`` arrives as
(B, 2 views, 2, C, *view), index 0 the cut-out input and 1 the clean target, and ``target`` carries the rotation
labels and cut-out masks packed into one uint8 tensor (``pack_view_targets``).

Heads (``SwinUNETRModel``): rotation and contrast heads are linear layers on the globally pooled bottleneck (the
ResEnc's last stage, the Primus's EVA tokens). The reference reads one bottleneck voxel/token each (position 0 for
the rotation, 1 for the contrast: its own ToDo, MONAI issue 87), which sees a corner of the crop only;
``pooled_heads=False`` restores that. Reconstruction: a ResEnc decodes the bottleneck alone, without skips, with the
light-weight decoder (one transposed conv and one conv block per encoder stage, AMAES'), as the reference's head
mirrors the encoder stages without skips: with the U-Net's skips the visible voxels could be copied from the stem.
A Primus decodes with its own patch decoder (``up_projection``): its tokens have attended to the whole crop, and the
reference's convolutional head (3x3 convs up to full resolution, 108 channels at 160^3 for Primus-M) would do part of
the inpainting in a part that is thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from torch import nn

from nnssl.methods.amaes import LightweightDecoder
from nnssl.methods.contrastive import DEFAULT_TEMPERATURE, nt_xent_loss
from nnssl.methods.encoder_features import freeze_parts_without_gradient, is_primus_network, primus_tokens

NUM_ROTATIONS = 4  # 0, 90, 180, 270 degrees
ROTATION_DIMS = (1, 2)  # of a (C, X, Y, Z) sample: the (x, y) plane, as the reference
NUM_VIEWS = 2
CONTRAST_DIM = 512  # the reference's contrast head width
Box = Tuple[slice, ...]


# ------------------------------------------------------------------------------------------------------- cut-out
@dataclass(frozen=True)
class CutoutConfig:
    """Each cut-out pass covers a fraction drawn from U(0, ``max_fraction``) of the view (counted box by box, so
    overlapping boxes count twice) with boxes whose edges are ``min_block_fraction`` to ``max_block_fraction`` of the
    view's edge (the reference: 0.3, 0.05, 0.25; two passes, so up to 60 % of a view is replaced)."""

    max_fraction: float = 0.3
    min_block_fraction: float = 0.05
    max_block_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not (0 <= self.max_fraction <= 1 and 0 < self.min_block_fraction <= self.max_block_fraction <= 1):
            raise ValueError(f"CutoutConfig needs 0 <= max_fraction <= 1 and 0 < min_block_fraction <= "
                             f"max_block_fraction <= 1, got {self}.")


def sample_cutout_boxes(shape: Sequence[int], config: CutoutConfig, rng: np.random.Generator) -> List[Box]:
    """Boxes of one cut-out pass over a view of spatial ``shape``; a box may be cut short by the view's far edge."""
    shape = np.asarray(shape)
    low = np.maximum((shape * config.min_block_fraction).astype(int), 1)
    high = np.maximum((shape * config.max_block_fraction).astype(int), low)
    to_cover = rng.uniform(0, config.max_fraction) * shape.prod()
    boxes: List[Box] = []
    covered = 0
    while covered < to_cover:
        starts = rng.integers(0, shape - low + 1)
        stops = np.minimum(starts + rng.integers(low, high + 1), shape)
        boxes.append(tuple(slice(int(a), int(b)) for a, b in zip(starts, stops)))
        covered += int((stops - starts).prod())
    return boxes


def unit_range_noise(shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
    """Gaussian noise rescaled to [0, 1] (the reference's fill)."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    span = noise.max() - noise.min()
    return torch.from_numpy((noise - noise.min()) / span if span > 0 else np.zeros_like(noise))


def cut_out(view: torch.Tensor, donor: torch.Tensor, config: CutoutConfig,
            rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cut-out copy of a (C, *spatial) view, (*spatial) bool mask of the replaced voxels): one pass of noise boxes,
    then one pass of boxes taken from ``donor`` at the same place."""
    out = view.clone()
    mask = torch.zeros(view.shape[1:], dtype=torch.bool)
    for source in (None, donor):
        for box in sample_cutout_boxes(view.shape[1:], config, rng):
            region = (slice(None),) + box
            out[region] = unit_range_noise(out[region].shape, rng) if source is None else source[region]
            mask[box] = True
    return out, mask


# ----------------------------------------------------------------------------------------------- data pipeline
def pack_view_targets(rotations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(views,) labels and (views, *spatial) masks -> (views, 1 + voxels) uint8: nnU-Net's loader carries one tensor
    (the ``segmentation`` slot; SwinUNETR uses no label map), so the label leads each view's flattened mask."""
    return torch.cat([rotations.to(torch.uint8)[:, None], masks.flatten(1).to(torch.uint8)], dim=1)


def unpack_view_targets(packed: torch.Tensor, view_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, views, 1 + voxels) -> rotation labels (B, views) int64 and cut-out masks (B, views, *view_size) bool."""
    return packed[..., 0].long(), packed[..., 1:].view(*packed.shape[:2], *view_size).bool()


class SwinUNETRViewTransform(BasicTransform):
    """A (C, X, Y, Z) crop (X == Y) -> ``image`` (2, 2, C, X, Y, Z) [view][cut-out input, clean rotated view] and
    ``segmentation`` = ``pack_view_targets`` of the two views' rotation labels and cut-out masks.

    Randomness comes from NumPy's global stream (seeded per worker), through one Generator per call."""

    def __init__(self, cutout: CutoutConfig = CutoutConfig()) -> None:
        super().__init__()
        self.cutout = cutout

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        if image.shape[ROTATION_DIMS[0]] != image.shape[ROTATION_DIMS[1]]:
            raise ValueError(f"SwinUNETR rotates views in the (x, y) plane, which must be square; got a crop of "
                             f"{tuple(image.shape[1:])}.")
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31))
        rotations = torch.from_numpy(rng.integers(0, NUM_ROTATIONS, size=NUM_VIEWS))
        clean = torch.stack([torch.rot90(image, int(k), ROTATION_DIMS) for k in rotations])
        inputs, masks = zip(*(cut_out(clean[v], clean[1 - v], self.cutout, rng) for v in range(NUM_VIEWS)))
        data_dict["image"] = torch.stack([torch.stack(inputs), clean], dim=1)
        data_dict["segmentation"] = pack_view_targets(rotations, torch.stack(masks))
        return data_dict


# ------------------------------------------------------------------------------------------------------- network
class SwinUNETROutput(NamedTuple):
    rotation_logits: torch.Tensor  # (N, 4)
    contrast: torch.Tensor  # (N, CONTRAST_DIM)
    reconstruction: torch.Tensor  # (N, C, *view)


class SwinUNETRModel(nn.Module):
    """The plans' plain dna network (``network``: its keys stay a fresh network's) plus the SwinUNETR heads.

    ResEnc: the U-Net's own decoder is frozen (it gets no gradient; its keys stay for loading) and
    ``reconstruction_decoder`` decodes the bottleneck. Primus: every part is used (patch embedding, EVA, patch
    decoder)."""

    def __init__(self, network: nn.Module, pooled_heads: bool = True, contrast_dim: int = CONTRAST_DIM) -> None:
        super().__init__()
        self.network = network
        self.primus = is_primus_network(network)
        self.pooled_heads = pooled_heads
        if self.primus:
            width = int(network.embed_dim)
        else:
            freeze_parts_without_gradient(network)
            self.reconstruction_decoder = LightweightDecoder(network.encoder, network.decoder.num_classes)
            width = int(network.encoder.output_channels[-1])
        self.rotation_head = nn.Linear(width, NUM_ROTATIONS)
        self.contrast_head = nn.Linear(width, contrast_dim)

    def bottleneck_and_reconstruction(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, width, *grid) bottleneck features and (B, C, *view) reconstruction."""
        if self.primus:
            grid = [s // k for s, k in zip(x.shape[2:], self.network.down_projection.proj.kernel_size)]
            bottleneck = primus_tokens(self.network, x).transpose(1, 2).reshape(x.shape[0], -1, *grid)
            return bottleneck, self.network.up_projection(bottleneck)
        stages = self.network.encoder(x)
        return stages[-1], self.reconstruction_decoder(stages)

    def forward(self, x: torch.Tensor) -> SwinUNETROutput:
        bottleneck, reconstruction = self.bottleneck_and_reconstruction(x)
        positions = bottleneck.flatten(2)  # (B, width, voxels or tokens)
        if self.pooled_heads:
            rotation_input = contrast_input = positions.mean(dim=2)
        else:  # the reference: one position each
            rotation_input, contrast_input = positions[:, :, 0], positions[:, :, 1]
        return SwinUNETROutput(self.rotation_head(rotation_input), self.contrast_head(contrast_input), reconstruction)


# ---------------------------------------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class SwinUNETRLossWeights:
    rotation: float = 1.0
    contrast: float = 1.0
    reconstruction: float = 1.0


def swinunetr_loss_parts(output: SwinUNETROutput, rotations: torch.Tensor, clean: torch.Tensor,
                         temperature: float = DEFAULT_TEMPERATURE) -> Dict[str, torch.Tensor]:
    """The three terms (float32) for N = 2B views ordered sample by sample (view a, view b of sample 0, ...)."""
    contrast = output.contrast.float().view(-1, NUM_VIEWS, output.contrast.shape[-1])
    return {
        "rotation": F.cross_entropy(output.rotation_logits.float(), rotations),
        "contrast": nt_xent_loss(contrast[:, 0], contrast[:, 1], temperature),
        "reconstruction": F.l1_loss(output.reconstruction.float(), clean.float()),
    }


def weighted_loss(parts: Dict[str, torch.Tensor], weights: SwinUNETRLossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in parts.items())


def split_views(data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (B, 2, 2, C, *view) batch -> cut-out inputs and clean targets, each (2B, C, *view), sample by sample."""
    return data[:, :, 0].flatten(0, 1), data[:, :, 1].flatten(0, 1)


@dataclass(frozen=True)
class SwinUNETRGeometry:
    """Both views come from one crop of ``view_size``: the loader's patch and the network's input are that crop."""

    view_size: Tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.view_size) != 3 or self.view_size[0] != self.view_size[1]:
            raise ValueError(f"SwinUNETR views are 3D with a square (x, y) plane (rotated in it), got "
                             f"{self.view_size}.")

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        return self.view_size

    @property
    def crop_size(self) -> Tuple[int, int, int]:
        return self.view_size

    @classmethod
    def square(cls, patch_size: Sequence[int]) -> "SwinUNETRGeometry":
        """The plans' patch with its (x, y) plane made square (its smaller edge)."""
        edge = min(int(patch_size[0]), int(patch_size[1]))
        return cls((edge, edge, int(patch_size[2])))

