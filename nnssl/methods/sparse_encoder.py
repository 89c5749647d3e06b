"""Sparse-convolution emulation around dynamic-network-architectures' (dna) encoder, in place.

A CNN cannot skip masked voxels, so SparK/S3D emulate a sparse encoder on the dense one: every convolution and pooling
output is multiplied by the mask at its own resolution (masked regions do not erode as the receptive field grows), and
every InstanceNorm takes its statistics over the visible voxels only (zeros at masked voxels would shift them).

The encoder is instrumented without changing its parameters, state_dict keys or module aliases:
* convolutions and pools get a forward hook that re-applies the mask to their output;
* each InstanceNorm3d object is swapped for ONE ``MaskedInstanceNorm3d`` that holds the original Parameter objects and
  is placed under every name the original had (dna registers it as ``.norm`` and ``.all_modules.1``).
The mask reaches these modules through a ``MaskContext`` owned by the model, set only for the duration of a forward;
with no mask set, every instrumented module behaves exactly like the original, so the same network still runs densely.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from nnssl.methods.masking import upsample_mask

_REMASKED_OPS = (nn.Conv3d, nn.AvgPool3d, nn.MaxPool3d)
_SUPPORTED_NORMS = (nn.InstanceNorm3d,)
# _NormBase covers every BatchNorm and InstanceNorm variant.
_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class MaskContext:
    """The visible grid mask of the forward in progress, and its up-sampled copies (computed once per resolution)."""

    def __init__(self) -> None:
        self._grid_mask: torch.Tensor | None = None
        self._cache: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self._grid_mask is not None

    def set(self, grid_mask: torch.Tensor) -> None:
        self._grid_mask = grid_mask
        self._cache = {}

    def clear(self) -> None:
        """Forget the mask (the autograd graph keeps the up-sampled copies it needs)."""
        self._grid_mask = None
        self._cache = {}

    def visible(self, spatial_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, *spatial_shape) visible mask in ``dtype``: the activation dtype for re-masking (no up-cast), float32
        for norm statistics. Cached per forward, so each resolution is up-sampled once per dtype."""
        if self._grid_mask is None:
            raise RuntimeError("MaskContext.visible() called outside a masked forward.")
        key = (tuple(int(s) for s in spatial_shape), dtype)
        if key not in self._cache:
            self._cache[key] = upsample_mask(self._grid_mask, key[0]).to(dtype)
        return self._cache[key]


def _channel_view(parameter: torch.Tensor | None, dtype: torch.dtype, dims: int) -> torch.Tensor | None:
    """A per-channel affine parameter as (1, C, 1, ...) in the compute dtype, broadcastable against activations."""
    return None if parameter is None else parameter.to(dtype).view((1, -1) + (1,) * dims)


class _MaskedInstanceNormFunction(torch.autograd.Function):
    """Masked InstanceNorm with a hand-written backward.

    Autograd through the elementwise formulation records about a dozen full-size ops and keeps several float32
    copies of the activation alive for backward; this keeps only the input (as nn.InstanceNorm does), reuses its
    buffers in place and needs about half the memory passes in each direction. Moments are two-pass (mean first, then
    the centred sum of squares) in float32 at least, so low-precision inputs lose nothing in the statistics.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, visible: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        dtype = torch.promote_types(x.dtype, torch.float32)
        m = visible.to(dtype)
        count = m.sum(dim=dims, keepdim=True).clamp_min_(1.0)
        # x * mask is exact in x's own dtype (the mask is 0/1): no float32 copy of a low-precision activation
        mean = (x * m.to(x.dtype)).sum(dim=dims, keepdim=True, dtype=dtype).div_(count)
        centred = (x - mean).mul_(m)  # compute dtype by type promotion, 0 at masked voxels
        var = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square_().div_(count)
        rstd = var.add_(eps).rsqrt_()
        w, b = _channel_view(weight, dtype, len(dims)), _channel_view(bias, dtype, len(dims))
        out = centred.mul_(rstd if w is None else rstd * w)
        if b is not None:
            out.addcmul_(m, b)
        ctx.save_for_backward(x, m, count, mean, rstd, weight)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, m, count, mean, rstd, weight = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        # out = m * (w * (x - mean) * rstd + b) with mean and rstd over visible voxels; c = (x - mean) * m:
        # dx = k * (g - m * sum(g) / n - c * rstd^2 * sum(g * c) / n), k = w * rstd, g = grad_out * m
        g = grad_out * m.to(grad_out.dtype)  # exact in the gradient's dtype
        c = (x - mean).mul_(m)
        sum_g = g.sum(dim=dims, keepdim=True, dtype=m.dtype)
        sum_gc = (g * c).sum(dim=dims, keepdim=True)
        w = _channel_view(weight, m.dtype, len(dims))
        k = rstd if w is None else rstd * w
        grad_x = c.mul_(k * rstd.square() * sum_gc / -count).addcmul_(g, k).addcmul_(m, k * sum_g / -count)
        grad_weight = (sum_gc * rstd).sum(0).flatten() if ctx.needs_input_grad[2] else None
        grad_bias = sum_g.sum(0).flatten() if ctx.needs_input_grad[3] else None
        return grad_x.to(x.dtype), None, grad_weight, grad_bias, None


def masked_instance_norm(x: torch.Tensor, visible: torch.Tensor, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm with per-sample, per-channel moments over the visible voxels only; masked voxels come out 0.

    Masked moments instead of gathering the visible voxels: no nonzero()/gather, no equal-count requirement, and
    plain elementwise ops and reductions that torch.compile fuses. Statistics in float32 (or x's dtype if wider),
    output in x's dtype. ``visible`` is (B, 1, *spatial), 0/1.
    """
    return _MaskedInstanceNormFunction.apply(x, visible, weight, bias, eps)


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    """InstanceNorm3d that normalises over the visible voxels while its context holds a mask, and plainly otherwise."""

    def __init__(self, norm: nn.InstanceNorm3d, context: MaskContext) -> None:
        if norm.track_running_stats:
            raise NotImplementedError("Sparse emulation supports InstanceNorm3d without running statistics only "
                                      "(track_running_stats=False, the nnU-Net default).")
        super().__init__(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=False)
        if norm.affine:
            # The original Parameter objects, not copies: optimiser, state_dict and aliases all keep seeing them.
            self.weight = norm.weight
            self.bias = norm.bias
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:
            return super().forward(x)
        return masked_instance_norm(x, self.context.visible(x.shape[2:]), self.weight, self.bias, self.eps)


def _remask_output(context: MaskContext, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook: zero the op's output at masked positions of its OWN (output) resolution.

    In place: convolution and pooling do not keep their output for backward, so this is autograd-safe and saves one
    activation-sized allocation per op; the backward still multiplies the gradient by the mask.
    """
    if context.active:
        output.mul_(context.visible(output.shape[2:], output.dtype))


def _check_supported(encoder: nn.Module) -> None:
    for name, module in encoder.named_modules():
        if isinstance(module, MaskedInstanceNorm3d):
            raise ValueError("This encoder is already sparsified; wrap each network in one S3D model only.")
        if isinstance(module, _NORM_BASES) and not isinstance(module, _SUPPORTED_NORMS):
            raise NotImplementedError(f"Sparse emulation supports InstanceNorm3d only; encoder module {name!r} is a "
                                      f"{type(module).__name__} (its statistics would include the masked zeros).")


def _swap_norms(encoder: nn.Module, context: MaskContext) -> None:
    """Replace every InstanceNorm3d by one masked wrapper per original object, under all of the original's names."""
    wrappers: dict[int, MaskedInstanceNorm3d] = {}
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not isinstance(child, MaskedInstanceNorm3d):
                if id(child) not in wrappers:
                    wrappers[id(child)] = MaskedInstanceNorm3d(child, context)
                setattr(parent, name, wrappers[id(child)])


def sparsify_encoder(encoder: nn.Module, context: MaskContext) -> None:
    """Instrument a dna encoder in place so that, while ``context`` holds a mask, it behaves as a sparse CNN."""
    _check_supported(encoder)
    _swap_norms(encoder, context)
    for module in encoder.modules():  # modules() visits aliased modules once, so each op gets exactly one hook
        if isinstance(module, _REMASKED_OPS):
            module.register_forward_hook(partial(_remask_output, context))


def sparse_encode(encoder: nn.Module, context: MaskContext, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Stage outputs of a sparsified encoder for a masked input; the input itself is masked first (no stem leak)."""
    context.set(mask)
    try:
        features = encoder(x * context.visible(x.shape[2:], x.dtype))
    finally:
        context.clear()
    if not isinstance(features, (list, tuple)):
        raise ValueError("The encoder must return the outputs of all stages (dna's return_skips=True).")
    return list(features)
