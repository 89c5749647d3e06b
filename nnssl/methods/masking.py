"""Block masks for masked-image-modelling pretraining (S3D and the dense MAE baseline).

A mask is a coarse grid with one cell per ``block_size``^3 block of the patch: 1 = visible, 0 = masked. The ratio of
masked cells is drawn once per batch, from a stream that depends on the seed only, so every DDP rank trains on the
same ratio; the block pattern is drawn per sample from a stream that also depends on the rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# Slack when rounding ratio * n_cells down, so a representation error (0.29 * 100 = 28.999...) does not cost a cell.
_ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class MaskingConfig:
    """How a batch is masked: cubic blocks of ``block_size`` voxels, masked fraction drawn from U(lo, hi) per batch.

    ``block_size=16`` is what the reference implementation trains with (a 10^3 grid at 160^3, bottleneck unmasked);
    32 is what the S3D paper describes (a 5^3 grid aligned with the bottleneck). ``ratio_range=(r, r)`` fixes the ratio.
    """

    block_size: int = 16
    ratio_range: tuple[float, float] = (0.6, 0.9)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"MaskingConfig.block_size must be a positive number of voxels, got {self.block_size}.")
        low, high = self.ratio_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"MaskingConfig.ratio_range must satisfy 0 <= lo <= hi < 1 (at least one block stays "
                             f"visible), got {self.ratio_range}.")


def mask_grid_shape(patch_size: Sequence[int], block_size: int) -> tuple[int, int, int]:
    """Number of blocks along each axis of a 3D patch; the patch must be tiled exactly by the blocks."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"Block masks need a 3D patch size, got {patch}.")
    if any(p % block_size for p in patch):
        raise ValueError(f"Patch size {patch} is not divisible by the mask block size {block_size}: every axis of the "
                         f"patch must be a multiple of the block size (choose another block size or patch size).")
    return patch[0] // block_size, patch[1] // block_size, patch[2] // block_size


def _pattern_seed(seed: int, rank: int) -> int:
    """A well-mixed 64-bit seed for the per-rank pattern stream (different ranks must not draw the same patterns)."""
    words = np.random.SeedSequence(entropy=seed, spawn_key=(rank,)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 32) | int(words[1])


def _resolve_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means the current CUDA device; generators need the explicit index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class BlockMaskSampler:
    """Draws (B, 1, gx, gy, gz) visible masks with reproducible, resumable random streams."""

    def __init__(self, patch_size: Sequence[int], config: MaskingConfig, seed: int = 0, rank: int = 0) -> None:
        self.grid_shape = mask_grid_shape(patch_size, config.block_size)
        self.config = config
        self.seed = seed
        self.rank = rank
        self._ratio_rng = np.random.Generator(np.random.PCG64(seed))
        self._pattern_gen: torch.Generator | None = None
        self._pending_pattern_state: dict[str, Any] | None = None

    @property
    def n_cells(self) -> int:
        return math.prod(self.grid_shape)

    def n_masked(self, ratio: float) -> int:
        """Masked cells per sample for a ratio: rounded down, identical for every sample of the batch."""
        return int(math.floor(ratio * self.n_cells + _ROUNDING_SLACK))

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """One batch of masks, built on ``device``; float32, 1 = visible, 0 = masked."""
        device = _resolve_device(device)
        ratio = float(self._ratio_rng.uniform(*self.config.ratio_range))
        scores = torch.rand(batch_size, self.n_cells, device=device, generator=self._generator_for(device))
        # The n_masked lowest-scoring cells of each sample are masked: a uniform random subset of exact size.
        ranks = scores.argsort(dim=1).argsort(dim=1)
        visible = (ranks >= self.n_masked(ratio)).to(torch.float32)
        return visible.view(batch_size, 1, *self.grid_shape)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The pattern generator on ``device``; created (and a loaded state applied) the first time it is needed."""
        if self._pattern_gen is not None and self._pattern_gen.device == device:
            return self._pattern_gen
        generator = torch.Generator(device=device)
        generator.manual_seed(_pattern_seed(self.seed, self.rank))
        pending = self._pending_pattern_state
        if pending is not None:
            if pending["device_type"] != device.type:
                raise ValueError(f"The mask sampler state was saved on a {pending['device_type']} device and cannot "
                                 f"continue its pattern stream on {device.type}; resume on the same device type.")
            generator.set_state(pending["state"])
            self._pending_pattern_state = None
        self._pattern_gen = generator
        return generator

    def state_dict(self) -> dict:
        """Both random streams, so a resumed run continues with the masks it would have drawn next."""
        if self._pattern_gen is not None:
            pattern = {"device_type": self._pattern_gen.device.type, "state": self._pattern_gen.get_state()}
        else:
            pattern = copy.deepcopy(self._pending_pattern_state)
        return {"ratio_rng": copy.deepcopy(self._ratio_rng.bit_generator.state), "pattern_rng": pattern}

    def load_state_dict(self, state: dict) -> None:
        self._ratio_rng.bit_generator.state = copy.deepcopy(state["ratio_rng"])
        self._pattern_gen = None
        self._pending_pattern_state = copy.deepcopy(state["pattern_rng"])


def upsample_mask(mask: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Nearest up-sampling of a (B, 1, *grid) mask to (B, 1, *spatial_shape) by integer factors.

    A map coarser than the grid on every axis (the bottleneck when blocks are smaller than its voxels) gets all ones:
    nothing there can be masked, and no masked intensity reaches it because every finer level is zero where masked.
    """
    batch, channels, *grid = mask.shape
    shape = [int(s) for s in spatial_shape]
    if len(shape) != len(grid):
        raise ValueError(f"Mask grid {tuple(grid)} and target shape {tuple(shape)} differ in dimensionality.")
    if all(s < g for s, g in zip(shape, grid)):
        return mask.new_ones((batch, channels, *shape))
    if any(s % g for s, g in zip(shape, grid)):
        raise ValueError(f"Cannot up-sample a mask grid {tuple(grid)} to {tuple(shape)}: every axis needs an integer "
                         f"factor (or the map must be coarser than the grid on every axis).")
    interleaved, expanded = [batch, channels], [batch, channels]
    for size, cells in zip(shape, grid):
        interleaved += [cells, 1]
        expanded += [cells, size // cells]
    # (B, C, g0, 1, g1, 1, ...) expanded to (B, C, g0, f0, g1, f1, ...): one copy, no interpolation kernel.
    return mask.reshape(interleaved).expand(expanded).reshape(batch, channels, *shape)
