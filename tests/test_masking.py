"""Block masks: ratio statistics, layout, per-sample patterns, DDP-rank behaviour and resumable random streams."""

import io

import pytest
import torch

from nnssl.methods.masking import BlockMaskSampler, MaskingConfig, mask_grid_shape, upsample_mask


def masked_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of masked cells."""
    return 1.0 - mask.flatten(1).mean(dim=1)


def test_variable_ratio_statistics_over_many_batches():
    sampler = BlockMaskSampler((160, 160, 160), MaskingConfig(block_size=16, ratio_range=(0.6, 0.9)), seed=3)
    fractions = torch.stack([masked_fraction(sampler.sample(1))[0] for _ in range(600)])
    assert fractions.min() >= 0.6 and fractions.max() <= 0.9
    assert abs(fractions.mean().item() - 0.75) < 0.015
    assert fractions.min() < 0.62 and fractions.max() > 0.88  # the whole range is used, not a fixed value


@pytest.mark.parametrize("ratio, patch, expected_masked", [(0.75, (64, 64, 64), 48), (0.75, (160, 160, 160), 750),
                                                          (0.29, (160, 160, 160), 290)])
def test_fixed_ratio_masks_exactly_round_down_of_ratio_times_cells(ratio, patch, expected_masked):
    sampler = BlockMaskSampler(patch, MaskingConfig(block_size=16, ratio_range=(ratio, ratio)))
    for _ in range(3):
        mask = sampler.sample(4)
        assert ((1 - mask).flatten(1).sum(dim=1) == expected_masked).all()


def test_mask_shape_dtype_values_and_per_sample_patterns():
    sampler = BlockMaskSampler((64, 32, 48), MaskingConfig(block_size=16), seed=1)
    mask = sampler.sample(6)
    assert mask.shape == (6, 1, 4, 2, 3) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    visible_counts = mask.flatten(1).sum(dim=1)
    assert (visible_counts == visible_counts[0]).all()  # one ratio per batch, same count for every sample
    flat = mask.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))


def test_upsampled_mask_is_constant_within_grid_aligned_blocks():
    block = 8
    mask = BlockMaskSampler((32, 16, 24), MaskingConfig(block_size=block), seed=2).sample(2)
    full = upsample_mask(mask, (32, 16, 24))
    assert full.shape == (2, 1, 32, 16, 24)
    blocks = full.reshape(2, 1, 4, block, 2, block, 3, block)
    assert torch.equal(blocks, mask.reshape(2, 1, 4, 1, 2, 1, 3, 1).expand_as(blocks))
    reference = mask.repeat_interleave(block, 2).repeat_interleave(block, 3).repeat_interleave(block, 4)
    assert torch.equal(full, reference)


def test_upsample_to_coarser_map_gives_ones_and_rejects_non_integer_factors():
    mask = torch.zeros(2, 1, 10, 10, 10)
    assert torch.equal(upsample_mask(mask, (5, 5, 5)), torch.ones(2, 1, 5, 5, 5))
    assert torch.equal(upsample_mask(mask, (10, 10, 10)), mask)
    with pytest.raises(ValueError, match="integer factor"):
        upsample_mask(mask, (15, 20, 20))
    with pytest.raises(ValueError, match="integer factor"):
        upsample_mask(mask, (5, 20, 20))


def test_ranks_share_ratios_but_draw_different_patterns():
    config = MaskingConfig(block_size=16, ratio_range=(0.6, 0.9))
    rank0 = BlockMaskSampler((160, 160, 160), config, seed=7, rank=0)
    rank1 = BlockMaskSampler((160, 160, 160), config, seed=7, rank=1)
    for _ in range(5):
        mask0, mask1 = rank0.sample(2), rank1.sample(2)
        assert torch.equal(masked_fraction(mask0), masked_fraction(mask1))
        assert not torch.equal(mask0, mask1)


def test_same_seed_reproduces_and_other_seed_differs():
    config = MaskingConfig(block_size=16)
    first = [BlockMaskSampler((64, 64, 64), config, seed=5).sample(3) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    sampler_a = BlockMaskSampler((64, 64, 64), config, seed=5)
    sampler_b = BlockMaskSampler((64, 64, 64), config, seed=5)
    assert all(torch.equal(sampler_a.sample(3), sampler_b.sample(3)) for _ in range(4))
    assert not torch.equal(BlockMaskSampler((64, 64, 64), config, seed=6).sample(3), first[0])


def test_state_dict_round_trip_continues_both_streams():
    config = MaskingConfig(block_size=16, ratio_range=(0.6, 0.9))
    original = BlockMaskSampler((160, 160, 160), config, seed=11, rank=2)
    for _ in range(3):
        original.sample(2)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # as inside a training checkpoint
    expected = [original.sample(2) for _ in range(3)]

    buffer.seek(0)
    resumed = BlockMaskSampler((160, 160, 160), config, seed=11, rank=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(resumed.sample(2), mask) for mask in expected)


def test_non_divisible_patch_and_invalid_config_raise():
    with pytest.raises(ValueError, match="not divisible"):
        mask_grid_shape((160, 160, 150), 16)
    with pytest.raises(ValueError, match="not divisible"):
        BlockMaskSampler((64, 64, 40), MaskingConfig(block_size=16))
    assert mask_grid_shape((160, 160, 160), 32) == (5, 5, 5)
    with pytest.raises(ValueError, match="ratio_range"):
        MaskingConfig(ratio_range=(0.9, 0.6))
    with pytest.raises(ValueError, match="ratio_range"):
        MaskingConfig(ratio_range=(0.5, 1.0))
