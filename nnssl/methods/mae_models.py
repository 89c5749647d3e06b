"""Masked-autoencoder pretraining models around an unmodified dna ResidualEncoderUNet from the nnU-Net plans.

``S3DModel`` is the S3D sparse MAE (SparK for 3D CNNs): a sparse-emulated encoder, per-stage densification (mask token
and 3x3x3 conv) and the network's own full decoder with skips. ``DenseMAEModel`` is the ablation baseline that feeds the
zero-masked patch through the dense network. In both, ``network`` stays a plain, loadable dna network: its state_dict
keys are those of a fresh one, so the pretrained weights transfer to fine-tuning without any key mapping.
"""

from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnssl.methods.masking import upsample_mask
from nnssl.methods.sparse_encoder import MaskContext, masked_instance_norm, sparse_encode, sparsify_encoder

_DENSIFY_NORM_EPS = 1e-5


def _require_single_output(network: nn.Module) -> None:
    """Reconstruction needs one full-resolution output, not a deep-supervision list."""
    if getattr(network.decoder, "deep_supervision", False):
        raise ValueError("MAE pretraining needs the network built with deep_supervision=False (set "
                         "network.decoder.deep_supervision = False, or build it with enable_deep_supervision=False).")


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != x.dim() or mask.shape[0] != x.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"Expected a (B, 1, *grid) mask for an input of shape {tuple(x.shape)}, got "
                         f"{tuple(mask.shape)}.")


def _mask_token(channels: int, std: float, device: torch.device) -> nn.Parameter:
    """A (1, C, 1, 1, 1) learnable fill value, truncated normal within +-std as in SparK."""
    token = torch.empty(1, channels, 1, 1, 1, device=device)
    nn.init.trunc_normal_(token, mean=0.0, std=std, a=-std, b=std)
    return nn.Parameter(token)


class S3DModel(nn.Module):
    """Sparse MAE: sparse-emulated encoder, densified stage outputs, the network's dense decoder.

    The encoder of ``network`` is instrumented in place (see ``nnssl.methods.sparse_encoder``); mask tokens and
    densification convs live outside ``network`` so that ``network.state_dict()`` remains a plain dna checkpoint.
    """

    def __init__(self, network: ResidualEncoderUNet, mask_token_std: float = 0.02) -> None:
        super().__init__()
        _require_single_output(network)
        self.network = network
        self.mask_context = MaskContext()
        sparsify_encoder(network.encoder, self.mask_context)
        channels = list(network.encoder.output_channels)
        device = next(network.parameters()).device
        self.mask_tokens = nn.ParameterList([_mask_token(c, mask_token_std, device) for c in channels])
        # No densification conv at the highest resolution (as in SparK/S3D); a dense 3x3x3 conv everywhere else.
        self.densify_convs = nn.ModuleList(
            [nn.Identity()]
            + [network.encoder.conv_op(c, c, kernel_size=3, padding=1, bias=True, device=device) for c in channels[1:]]
        )

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Sparse encoder stage outputs (highest resolution first); zero at masked positions."""
        _check_mask(x, mask)
        return sparse_encode(self.network.encoder, self.mask_context, x, mask)

    def densify(self, features: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Normalise over visible voxels, fill masked positions with the stage's token, then the densification conv."""
        densified = []
        for feature, token, conv in zip(features, self.mask_tokens, self.densify_convs):
            visible = upsample_mask(mask, feature.shape[2:])
            normalised = masked_instance_norm(feature, visible, eps=_DENSIFY_NORM_EPS)
            # normalised is exactly 0 where masked, so adding token * (1 - visible) fills in the token there and
            # leaves visible voxels untouched; unlike where(), its backward passes the gradient of normalised through
            # without a copy. The token stays in the graph even where nothing is masked: a zero gradient, never None.
            filled = torch.addcmul(normalised, (1 - visible).to(normalised.dtype), token.to(normalised.dtype))
            densified.append(conv(filled))
        return densified

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, num_classes, *patch) of the full patch from its visible blocks only."""
        return self.network.decoder(self.densify(self.encode(x, mask), mask))


class DenseMAEModel(nn.Module):
    """Dense MAE baseline: the zero-masked patch through the unmodified network."""

    def __init__(self, network: ResidualEncoderUNet) -> None:
        super().__init__()
        _require_single_output(network)
        self.network = network

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_mask(x, mask)
        return self.network(x * upsample_mask(mask, x.shape[2:]).to(x.dtype))
