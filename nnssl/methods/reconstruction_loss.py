"""Masked MSE: the MAE objective, scored on the voxels the model could not see."""

from __future__ import annotations

import torch

from nnssl.methods.masking import upsample_mask


def masked_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               region: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all masked voxels of the batch, pooled (one mean, not a mean of per-sample means).

    ``mask`` is the (B, 1, *grid) visible mask; ``region`` an optional (B, 1, *spatial) bool/0-1 map restricting the
    loss further (e.g. to anatomy). Computed in float32 so fp16/bf16 predictions do not lose precision in the
    reduction. With no voxel to score the result is a zero that still carries a grad_fn, so a training step never breaks.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"Prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape.")
    weight = 1.0 - upsample_mask(mask.float(), prediction.shape[2:])
    if region is not None:
        weight = weight * region.float()
    squared_error = (prediction.float() - target.float()).square()
    n_scored = weight.expand_as(squared_error).sum()
    return (squared_error * weight).sum() / n_scored.clamp_min(1.0)
