"""The probe network: a frozen dna network's stem and encoder under a light trainable head, for both families.

The head is the same for U-Nets and Primus: every feature map the encoder yields (each U-Net stage's output; a
Primus's token grid) is projected by a 1x1x1 conv to ``hidden`` channels; from the coarsest map up, the running sum
is trilinearly upsampled to the next map's grid and added to it (a linear top-down path as in feature pyramids:
each upsampling runs at its target's grid, so the whole path costs little more than one full-resolution map), then
upsampled to the input patch; one LeakyReLU and a 1x1x1 conv give the class logits. It cannot build new features of its own (no
spatial kernels), so its Dice says how much of the segmentation the frozen features already hold, and it is cheap
next to the encoder's forward.
"""

from typing import List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nnssl.methods.encoder_features import is_primus_network, primus_tokens

HIDDEN_CHANNELS = 16


def encoder_feature_channels(network: nn.Module) -> List[int]:
    """The channels of each feature map ``encoder_feature_maps`` returns."""
    if is_primus_network(network):
        return [int(network.embed_dim)]
    return [int(c) for c in network.encoder.output_channels]


def encoder_feature_maps(network: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """A U-Net's stage outputs (full resolution first); a Primus's output tokens as a (B, C, grid) map."""
    if not is_primus_network(network):
        return list(network.encoder(x))
    grid = [size // kernel for size, kernel in zip(x.shape[2:], network.down_projection.proj.kernel_size)]
    tokens = primus_tokens(network, x)
    return [tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[2], *grid)]


class ProbeHead(nn.Module):
    """Per-map 1x1x1 projections summed along a top-down upsampling path, then LeakyReLU and a 1x1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, hidden: int = HIDDEN_CHANNELS):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv3d(c, hidden, kernel_size=1) for c in in_channels)
        self.classifier = nn.Conv3d(hidden, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        summed = None
        for projection, feature in reversed(list(zip(self.projections, features))):
            projected = projection(feature)
            summed = projected if summed is None else projected + upsampled(summed, projected.shape[2:])
        return self.classifier(F.leaky_relu(upsampled(summed, size), 0.01))


def upsampled(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


class FrozenEncoderProbe(nn.Module):
    """``network``'s stem and encoder, frozen and in eval mode, under a trainable ``ProbeHead``.

    ``network`` must be a plain dna network of its own (the probe freezes it); its decoder is never run."""

    def __init__(self, network: nn.Module, num_classes: int):
        super().__init__()
        self.network = network.requires_grad_(False).eval()
        self.head = ProbeHead(encoder_feature_channels(network), num_classes)

    def train(self, mode: bool = True) -> "FrozenEncoderProbe":
        self.head.train(mode)  # the encoder stays in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = encoder_feature_maps(self.network, x)
        return self.head([f.float() for f in features], x.shape[2:])
