"""AMAES (augmented masked autoencoder): augmentation reversal and a light-weight decoder without skips.

The input is spatially augmented together with its reconstruction target (the representation should be covariant
to rotation/scaling/mirroring), then degraded by intensity and artefact augmentations that the target never sees
(the representation should be invariant to them), then masked. The network reconstructs the clean target.

Everything here runs inside nnU-Net's data pipeline as batchgeneratorsv2 transforms. nnU-Net's loader passes only
``image`` and ``segmentation`` through the transforms and collates only those, so the clean target travels as
extra image channels: ``CarryCleanTarget`` copies the (spatially augmented) image before the input-only
augmentations and appends the copy, and ``split_input_and_target`` separates the two halves of ``data`` again.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn

from nnssl.augmentation import spatial_transforms
from nnssl.methods.masking import upsample_mask
from nnssl.methods.reconstruction_loss import masked_reconstruction_loss


_INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


# --------------------------------------------------------------------------------------- artefact augmentations
def _random_spatial_axis(image: torch.Tensor) -> int:
    """A spatial axis of a (C, *spatial) tensor, as a tensor dimension index (channels are axis 0)."""
    return int(np.random.randint(1, image.dim()))


def _along(values: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a 1-D tensor so that it broadcasts along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.view(shape)


def _filter_kspace_lines(image: torch.Tensor, axis: int, gain: torch.Tensor) -> torch.Tensor:
    """Multiply the 1-D Fourier transform along ``axis`` by ``gain`` (one factor per k-space line); real part back.

    The real part is kept because z-scored intensities are signed; a magnitude image would fold negative values.
    """
    spectrum = torch.fft.fft(image.float(), dim=axis)
    filtered = torch.fft.ifft(spectrum * _along(gain, axis, image.dim()), dim=axis)
    return filtered.real.to(image.dtype)


class MotionGhostingTransform(ImageOnlyTransform):
    """Periodic-motion ghosts: every ``r``-th k-space line along one random axis is scaled by ``alpha``.

    Scaling that comb of lines subtracts (1 - alpha) / r times the image replicated at shifts of N / r along the
    axis (N = its length, when r divides N): faint copies of every structure displaced by multiples of N / r, the
    ghosting seen when the object moves periodically during phase encoding. AMAES: alpha in [0.85, 0.95],
    r in [2, 11] (both inclusive).
    """

    def __init__(self, alpha: Tuple[float, float] = (0.85, 0.95), repetitions: Tuple[int, int] = (2, 11)) -> None:
        super().__init__()
        self.alpha = alpha
        self.repetitions = repetitions

    def get_parameters(self, **data_dict) -> dict:
        return {"axis": _random_spatial_axis(data_dict["image"]),
                "alpha": float(np.random.uniform(*self.alpha)),
                "repetitions": int(np.random.randint(self.repetitions[0], self.repetitions[1] + 1))}

    def _apply_to_image(self, img: torch.Tensor, axis: int, alpha: float, repetitions: int) -> torch.Tensor:
        gain = torch.ones(img.shape[axis])
        gain[::repetitions] = alpha
        return _filter_kspace_lines(img, axis, gain)


class GibbsRingingTransform(ImageOnlyTransform):
    """Gibbs ringing: k-space truncation along one random axis (only the central ``keep_fraction`` of frequencies).

    Truncating the acquired frequencies is what produces ringing next to sharp edges in MR images: the high-frequency
    energy above the cutoff is removed and edges overshoot. AMAES gives no parameters; the kept fraction is drawn
    from ``keep_fraction`` (default 0.5-0.9, our choice: clearly visible ringing without turning into a blur).
    """

    def __init__(self, keep_fraction: Tuple[float, float] = (0.5, 0.9)) -> None:
        super().__init__()
        self.keep_fraction = keep_fraction

    def get_parameters(self, **data_dict) -> dict:
        return {"axis": _random_spatial_axis(data_dict["image"]),
                "keep_fraction": float(np.random.uniform(*self.keep_fraction))}

    def _apply_to_image(self, img: torch.Tensor, axis: int, keep_fraction: float) -> torch.Tensor:
        frequencies = torch.fft.fftfreq(img.shape[axis]).abs()  # cycles per voxel, 0 .. 0.5
        return _filter_kspace_lines(img, axis, (frequencies <= 0.5 * keep_fraction).float())


class BiasFieldTransform(ImageOnlyTransform):
    """Smooth multiplicative intensity inhomogeneity (MR bias field).

    field = exp(g), with g interpolated (linearly) from a coarse grid of ``control_points`` per axis whose values
    are U(-max_log_gain, max_log_gain): smooth and positive by construction (gains 0.74-1.35 by default). It
    multiplies the intensities above each channel's minimum, out = min + (x - min) * field, so background stays
    background and the gain acts on the signal as a coil sensitivity acts on raw MR magnitudes (z-scored data are a
    shifted, scaled copy of those). AMAES gives no parameters; these are our choice.
    """

    def __init__(self, max_log_gain: float = 0.3, control_points: int = 3) -> None:
        super().__init__()
        self.max_log_gain = max_log_gain
        self.control_points = control_points

    def get_parameters(self, **data_dict) -> dict:
        spatial_dims = data_dict["image"].dim() - 1
        grid = (torch.rand((1, 1) + (self.control_points,) * spatial_dims) * 2 - 1) * self.max_log_gain
        return {"log_gain_grid": grid}

    def _apply_to_image(self, img: torch.Tensor, log_gain_grid: torch.Tensor) -> torch.Tensor:
        spatial_dims = tuple(range(1, img.dim()))
        log_gain = F.interpolate(log_gain_grid, size=img.shape[1:], mode=_INTERPOLATION_MODES[len(spatial_dims)],
                                 align_corners=True)[0]
        minimum = img.amin(dim=spatial_dims, keepdim=True)
        return minimum + (img - minimum) * log_gain.exp().to(img.dtype)


class MultiplicativeGaussianNoiseTransform(ImageOnlyTransform):
    """Voxel-wise gain noise x * (1 + n), n ~ N(0, sigma), sigma ~ U(sigma_range) (AMAES, Table 5)."""

    def __init__(self, sigma_range: Tuple[float, float]) -> None:
        super().__init__()
        self.sigma_range = sigma_range

    def get_parameters(self, **data_dict) -> dict:
        return {"sigma": float(np.random.uniform(*self.sigma_range))}

    def _apply_to_image(self, img: torch.Tensor, sigma: float) -> torch.Tensor:
        return img * (1 + torch.randn_like(img) * sigma)


class PerAxisZoom:
    """Low-resolution zoom factor for one axis: U(low, high) with probability ``p_axis``, otherwise 1 (untouched).

    Passed as bgv2's ``scale`` callable, which SimulateLowResolutionTransform calls once per axis when axes are not
    synchronised: this is AMAES' per-axis probability. A class (not a lambda) so augmentation workers can pickle it.
    """

    def __init__(self, zoom: Tuple[float, float], p_axis: float) -> None:
        self.zoom = zoom
        self.p_axis = p_axis

    def __call__(self, *args, **kwargs) -> float:
        return float(np.random.uniform(*self.zoom)) if np.random.uniform() < self.p_axis else 1.0


def amaes_input_augmentation() -> ComposeTransforms:
    """The input-only augmentations of AMAES, Appendix B (Table 5), with its per-sample probabilities.

    Gaussian blur p 0.1 (sigma 0-1; bgv2 returns NaN at exactly 0, hence 1e-3), additive Gaussian noise p 0.2 and
    multiplicative Gaussian noise p 0.2 (sigma 1e-4-1e-3, the table's "[1^-3, 1^-4]"), gamma p 0.2 (image inverted
    with p 0.01; range 0.7-1.5 and retained statistics as nnU-Net, the table gives none), motion ghosting p 0.2,
    bias field p 0.33, Gibbs ringing p 0.2, simulated low resolution p 0.1 with p 0.33 per axis (zoom 0.5-1).
    The table's elastic deformation (p 0.33) is not applied: it moves anatomy, so applied to the input alone it
    would contradict the paper's rule that geometry is shared with the target, and nnssl's spatial pipeline has none.
    """
    return ComposeTransforms([
        RandomTransform(GaussianBlurTransform(blur_sigma=(1e-3, 1.0), synchronize_channels=True,
                                              synchronize_axes=True, p_per_channel=1), apply_probability=0.1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(1e-4, 1e-3), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.2),
        RandomTransform(MultiplicativeGaussianNoiseTransform(sigma_range=(1e-4, 1e-3)), apply_probability=0.2),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0.01, synchronize_channels=True,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.2),
        RandomTransform(MotionGhostingTransform(), apply_probability=0.2),
        RandomTransform(BiasFieldTransform(), apply_probability=0.33),
        RandomTransform(GibbsRingingTransform(), apply_probability=0.2),
        RandomTransform(SimulateLowResolutionTransform(scale=PerAxisZoom(zoom=(0.5, 1.0), p_axis=0.33),
                                                       synchronize_channels=True, synchronize_axes=False,
                                                       ignore_axes=None, allowed_channels=None, p_per_channel=1),
                        apply_probability=0.1),
    ])


# ------------------------------------------------------------------------------------ carrying the clean target
class CarryCleanTarget(BasicTransform):
    """Augments a copy of the image with ``input_only`` and appends the untouched image as the clean target.

    Output ``image``: (2C, *spatial) = (augmented input, clean target). With ``input_only=None`` (validation) both
    halves are the same image, so every batch has the same layout.
    """

    def __init__(self, input_only: Optional[BasicTransform]) -> None:
        super().__init__()
        self.input_only = input_only

    def apply(self, data_dict: dict, **params) -> dict:
        clean = data_dict["image"]
        # a copy: bgv2 intensity transforms work in place
        augmented = clean if self.input_only is None else self.input_only(image=clean.clone())["image"]
        data_dict["image"] = torch.cat([augmented, clean])
        return data_dict


def augmentation_reversal_transforms(patch_size: Sequence[int], rotation: Tuple[float, float],
                                     mirror_axes: Sequence[int]) -> ComposeTransforms:
    """nnssl's spatial pipeline (input and target alike), then the AMAES input-only augmentations."""
    return ComposeTransforms([spatial_transforms(patch_size, rotation, mirror_axes),
                              CarryCleanTarget(amaes_input_augmentation())])


def split_input_and_target(data: torch.Tensor, num_input_channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(augmented input, clean target) from a (B, 2C, *spatial) batch built by ``CarryCleanTarget``."""
    if data.shape[1] != 2 * num_input_channels:
        raise ValueError(f"Expected {2 * num_input_channels} channels (input and clean target, "
                         f"{num_input_channels} each), got {data.shape[1]}: the batch was not built with "
                         f"CarryCleanTarget.")
    return data[:, :num_input_channels], data[:, num_input_channels:]


def augmentation_reversal_loss(prediction: torch.Tensor, target: torch.Tensor,
                               region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE over ALL voxels, masked and visible (one pooled mean over the batch, optionally within ``region``).

    The AMAES paper states no masked-only loss: its MAE "reconstructs the entire image from a masked version" (§1)
    and the target is "the unmasked image, with only spatial transformations applied" (Fig. 2). Visible voxels
    carry signal too, because the intensity/artefact augmentations must be undone there. Implemented as the masked
    MSE with a one-cell grid that has no visible cell, so every voxel is scored.
    """
    nothing_visible = prediction.new_zeros((prediction.shape[0], 1) + (1,) * (prediction.dim() - 2))
    return masked_reconstruction_loss(prediction, target, nothing_visible, region)


# ------------------------------------------------------------------------------------------------------ network
class LightweightDecoder(nn.Module):
    """AMAES' light-weight decoder: per stage a transposed conv up and ONE conv block, no skip connections.

    Built from a dna encoder (channels, strides, kernels, conv/norm/nonlinearity as the encoder), from the
    bottleneck back to full resolution, then a 1x1x1 output conv. ``forward`` accepts the encoder's list of stage
    outputs (the dna decoder interface) but reads only the bottleneck, the last entry.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        channels: List[int] = list(encoder.output_channels)
        transpconv = get_matching_convtransp(conv_op=encoder.conv_op)
        self.upsamplers = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in range(len(channels) - 1, 0, -1):
            stride = encoder.strides[s]
            self.upsamplers.append(transpconv(channels[s], channels[s - 1], stride, stride, bias=encoder.conv_bias))
            self.stages.append(ConvDropoutNormReLU(
                encoder.conv_op, channels[s - 1], channels[s - 1], encoder.kernel_sizes[s - 1], 1, encoder.conv_bias,
                encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op, encoder.dropout_op_kwargs,
                encoder.nonlin, encoder.nonlin_kwargs))
        self.output = encoder.conv_op(channels[0], num_classes, 1, 1, 0, bias=True)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for upsample, stage in zip(self.upsamplers, self.stages):
            x = stage(upsample(x))
        return self.output(x)


class AMAESModel(nn.Module):
    """Dense masked autoencoder: the zero-masked input through the plans' dna encoder and a light-weight decoder.

    Holds the UNet's encoder as ``encoder`` (its keys stay the dna ``encoder.*`` keys) and drops the UNet's own
    decoder, which would get no gradient.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.encoder = network.encoder
        self.decoder = LightweightDecoder(network.encoder, network.decoder.num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = upsample_mask(mask, x.shape[2:]).to(x.dtype)
        return self.decoder(self.encoder(x * visible))
