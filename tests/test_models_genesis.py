"""Models Genesis: corruption semantics on small arrays, the restoration loss, and a stock nnUNetv2_train run."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import pretrain_smoke, tiny_network
from nnssl.citations import apa_lines
from nnssl.methods.models_genesis import (INPAINT, OUTPAINT, CorruptionPlan, ModelsGenesisConfig,
                                          ModelsGenesisTransform, corrupt, flip, inpaint, intensity_curve,
                                          nonlinear_intensity, outpaint, restoration_loss, restoration_pair,
                                          robust_range, sample_inpaint_boxes, sample_outpaint_boxes, sample_plan,
                                          sample_shuffle_windows, shuffle_windows)

CONFIG = ModelsGenesisConfig()
NO_CORRUPTION = dataclasses.replace(CONFIG, local_shuffle_rate=0, nonlinear_rate=0, paint_rate=0)


def unique_image(shape=(12, 13, 14)) -> np.ndarray:
    """Two channels of distinct values; channel 1 = 10 x channel 0, to see that channels move together."""
    first = np.random.default_rng(0).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)
    return np.stack([first, 10 * first])


def box_mask(shape, boxes) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


def test_decision_rates_match_the_reference():
    rng = np.random.default_rng(1)
    plans = [sample_plan(rng, CONFIG) for _ in range(6000)]

    def rate(predicate) -> float:
        return float(np.mean([predicate(p) for p in plans]))

    assert rate(lambda p: p.local_shuffle) == pytest.approx(0.5, abs=0.03)
    assert rate(lambda p: p.nonlinear) == pytest.approx(0.9, abs=0.02)
    assert rate(lambda p: p.decreasing_curve) == pytest.approx(0.5, abs=0.03)
    assert rate(lambda p: p.painting is None) == pytest.approx(0.1, abs=0.02)
    assert rate(lambda p: p.painting == INPAINT) == pytest.approx(0.9 * 0.2, abs=0.02)
    assert rate(lambda p: p.painting == OUTPAINT) == pytest.approx(0.9 * 0.8, abs=0.02)
    flips = np.array([len(p.flip_axes) for p in plans])
    assert flips.max() == 3
    for n in (1, 2, 3):
        assert np.mean(flips >= n) == pytest.approx(0.4 ** n, abs=0.02)
    assert {a for p in plans for a in p.flip_axes} == {0, 1, 2}


def test_flips_apply_to_input_and_target_alike():
    image = unique_image()
    for seed in range(20):
        plan = sample_plan(np.random.default_rng(seed), NO_CORRUPTION)
        corrupted, target = restoration_pair(image, np.random.default_rng(seed), NO_CORRUPTION)
        np.testing.assert_array_equal(target, flip(image, plan.flip_axes))
        np.testing.assert_array_equal(corrupted, target)
    np.testing.assert_array_equal(flip(image, (1, 1)), image)
    np.testing.assert_array_equal(flip(image, (2,)), image[:, :, :, ::-1])


def test_corrupt_applies_exactly_the_planned_steps():
    image = unique_image((20, 20, 20))
    lo, hi = robust_range(image, CONFIG.robust_percentiles)

    def corrupt_with(local_shuffle=False, nonlinear=False, painting=None) -> np.ndarray:
        plan = CorruptionPlan((), local_shuffle, nonlinear, False, painting)
        return corrupt(image, plan, np.random.default_rng(11), CONFIG)

    np.testing.assert_array_equal(corrupt_with(), image)
    shuffled = corrupt_with(local_shuffle=True)
    assert not np.array_equal(shuffled, image)
    assert np.isin(shuffled[0], image[0]).all()  # overlapping windows may duplicate values
    curved = corrupt_with(nonlinear=True)
    assert not np.array_equal(curved, image) and (curved >= lo).all() and (curved <= hi).all()
    assert np.isin(corrupt_with(painting=INPAINT), image).mean() > 0.5
    assert np.isin(corrupt_with(painting=OUTPAINT), image).mean() < 0.5


def test_shuffle_windows_sizes_and_positions():
    shape = (64, 50, 30)
    starts, sizes = sample_shuffle_windows(shape, 10_000, np.random.default_rng(2))
    for axis, s in enumerate(shape):
        assert sizes[:, axis].min() == 1 and sizes[:, axis].max() == s // 10
        assert starts[:, axis].min() == 0 and (starts[:, axis] + sizes[:, axis]).max() == s


def test_local_shuffling_permutes_inside_windows_only():
    image = unique_image()
    starts, sizes = np.array([[0, 0, 0], [6, 6, 6]]), np.array([[3, 4, 5], [4, 3, 2]])
    shuffled = shuffle_windows(image, starts, sizes, np.random.default_rng(3))
    windows = [tuple(slice(a, a + n) for a, n in zip(start, size)) for start, size in zip(starts, sizes)]
    for window in windows:
        before, after = image[(slice(None),) + window], shuffled[(slice(None),) + window]
        np.testing.assert_array_equal(np.sort(after.ravel()), np.sort(before.ravel()))
        assert not np.array_equal(after, before)
    outside = ~box_mask(image.shape[1:], windows)
    np.testing.assert_array_equal(shuffled[:, outside], image[:, outside])
    np.testing.assert_array_equal(shuffled[1], 10 * shuffled[0])  # one permutation for all channels


def test_local_shuffling_later_windows_win_and_read_the_uncorrupted_image():
    image = unique_image()
    starts, sizes = np.array([[0, 0, 0], [2, 2, 2]]), np.array([[5, 5, 5], [5, 5, 5]])
    shuffled = shuffle_windows(image, starts, sizes, np.random.default_rng(4))
    first, last = (slice(None), slice(0, 5), slice(0, 5), slice(0, 5)), (slice(None),) + (slice(2, 7),) * 3
    np.testing.assert_array_equal(np.sort(shuffled[last].ravel()), np.sort(image[last].ravel()))
    only_first = box_mask(image.shape[1:], [first[1:]]) & ~box_mask(image.shape[1:], [last[1:]])
    values = shuffled[0][only_first]
    assert len(set(values)) == len(values) and set(values) <= set(image[first][0].ravel())


@pytest.mark.parametrize("decreasing", [False, True])
def test_bezier_curves_are_monotonic(decreasing: bool):
    rng = np.random.default_rng(5)
    grid = np.linspace(0, 1, 501)
    for _ in range(50):
        xs, ys = intensity_curve(rng.random((2, 2)), decreasing, CONFIG.bezier_samples)
        mapped = np.interp(grid, xs, ys)
        steps = np.diff(mapped)
        assert (steps <= 1e-12).all() if decreasing else (steps >= -1e-12).all()
        assert (mapped[0], mapped[-1]) == ((1.0, 0.0) if decreasing else (0.0, 1.0))


def test_nonlinear_intensity_keeps_the_z_score_range():
    image = np.linspace(-3, 5, 20 ** 3, dtype=np.float32).reshape(1, 20, 20, 20)
    lo, hi = robust_range(image, CONFIG.robust_percentiles)
    assert lo.item() == pytest.approx(-2.96, abs=0.01) and hi.item() == pytest.approx(4.96, abs=0.01)
    curve = intensity_curve(np.random.default_rng(6).random((2, 2)), False, CONFIG.bezier_samples)
    mapped = nonlinear_intensity(image, lo, hi, curve)
    assert mapped.min() < -2.9 and mapped.max() > 4.9
    at_endpoints = np.mean((mapped == mapped.min()) | (mapped == mapped.max()))
    assert at_endpoints < 0.015  # only the 0.5 % tails; np.interp on raw z-scores would clamp 87.5 %
    clamped = np.interp(image, *curve)  # the reference: the curve applied to the z-scores themselves
    assert np.mean((clamped == 0) | (clamped == 1)) > 0.85
    identity = intensity_curve(np.array([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]), False, CONFIG.bezier_samples)
    np.testing.assert_allclose(nonlinear_intensity(image, lo, hi, identity), np.clip(image, lo, hi), atol=1e-5)
    inverted = nonlinear_intensity(image, lo, hi, intensity_curve(np.full((2, 2), 0.5), True, 100))
    assert inverted[0, 0, 0, 0] == pytest.approx(hi.item()) and inverted[0, -1, -1, -1] == pytest.approx(lo.item())


def test_constant_patch_gets_a_unit_range():
    lo, hi = robust_range(np.zeros((1, 4, 4, 4), np.float32), CONFIG.robust_percentiles)
    assert (lo.item(), hi.item()) == (0.0, 1.0)


def assert_boxes_within(boxes, shape, low, high, margin=3):
    for box in boxes:
        for axis, part in enumerate(box):
            assert low[axis] <= part.stop - part.start <= high[axis]
            assert part.start >= margin and part.stop <= shape[axis] - margin


def test_inpainting_boxes_and_fill():
    shape, rng = np.array((64, 48, 40)), np.random.default_rng(7)
    counts = []
    for _ in range(400):
        boxes = sample_inpaint_boxes(tuple(shape), rng, CONFIG)
        assert_boxes_within(boxes, shape, shape // 6, shape // 3)
        counts.append(len(boxes))
    assert min(counts) == 0 and max(counts) == 5
    assert np.mean(np.array(counts) == 0) == pytest.approx(0.05, abs=0.03)

    image = unique_image((20, 18, 16))
    lo, hi = robust_range(image, CONFIG.robust_percentiles)
    boxes = sample_inpaint_boxes(image.shape[1:], np.random.default_rng(8), dataclasses.replace(CONFIG,
                                                                                                 next_box_rate=1))
    painted = inpaint(image, boxes, rng, lo, hi)
    inside = box_mask(image.shape[1:], boxes)
    np.testing.assert_array_equal(painted[:, ~inside], image[:, ~inside])
    for channel in range(2):
        noise = painted[channel][inside]
        assert noise.min() >= lo[channel].item() and noise.max() <= hi[channel].item()
        assert not np.isin(noise, image[channel]).all()


def test_outpainting_restores_the_boxes_exactly():
    shape, rng = np.array((64, 48, 40)), np.random.default_rng(9)
    counts = []
    for _ in range(400):
        boxes = sample_outpaint_boxes(tuple(shape), rng, CONFIG)
        assert_boxes_within(boxes, shape, shape - 4 * shape // 7, shape - 3 * shape // 7)
        counts.append(len(boxes))
    assert min(counts) == 1 and max(counts) == 5

    image = unique_image((28, 28, 28))
    lo, hi = robust_range(image, CONFIG.robust_percentiles)
    boxes = sample_outpaint_boxes(image.shape[1:], rng, CONFIG)
    painted = outpaint(image, boxes, rng, lo, hi)
    inside = box_mask(image.shape[1:], boxes)
    np.testing.assert_array_equal(painted[:, inside], image[:, inside])
    outside = painted[:, ~inside]
    assert (outside >= lo.reshape(-1, 1)).all() and (outside <= hi.reshape(-1, 1)).all()
    assert not np.isin(outside[0], image[0]).all()


def test_transform_puts_corrupted_patch_in_image_and_clean_patch_in_segmentation():
    image = torch.from_numpy(np.random.default_rng(10).normal(size=(1, 24, 24, 24)).astype(np.float32))
    out = ModelsGenesisTransform()(image=image.clone(), segmentation=torch.zeros((1, 24, 24, 24), dtype=torch.int16))
    assert out["image"].dtype == out["segmentation"].dtype == torch.float32
    assert out["image"].shape == out["segmentation"].shape == image.shape
    # the target is the clean patch up to flips: same values, same (robust) range as the corrupted input
    torch.testing.assert_close(out["segmentation"].flatten().sort().values, image.flatten().sort().values)
    assert out["image"].min() >= image.min() and out["image"].max() <= image.max()


def test_restoration_loss_is_the_mean_over_all_voxels():
    clean = torch.zeros(2, 1, 4, 4, 4)
    restored = clean.clone()
    restored[0, 0, 0, 0, 0] = 2.0
    assert restoration_loss(restored, clean).item() == pytest.approx(4.0 / 128)
    assert restoration_loss(clean, clean).item() == 0.0


def test_models_genesis_pretraining_through_stock_nnunetv2_train(tiny_pretraining_dataset):
    out, checkpoint = pretrain_smoke(tiny_pretraining_dataset, "ModelsGenesisPretrainTrainer")
    assert (out / "reconstruction_epoch_0000.png").is_file()
    fresh = tiny_network()
    fresh.load_state_dict(checkpoint["network_weights"], strict=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_stem"] == "encoder.stem" and plan["key_to_encoder"] == "encoder.stages"
    assert any("Models Genesis" in line for line in apa_lines(checkpoint["citations"]))
    assert np.isfinite(checkpoint["logging"]["train_losses"][0])
