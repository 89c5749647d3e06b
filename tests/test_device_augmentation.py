"""Device-side spatial augmentation (``nnssl.device_augmentation``) and the pretraining loader, on the CPU.

The device path must reproduce batchgeneratorsv2's SpatialTransform + MirrorTransform (what the workers did before):
same geometry for a given draw, same distribution of draws, the same transform for images and region maps.
"""

import math

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnssl.augmentation import PRETRAINING_ROTATION, PRETRAINING_SCALING
from nnssl.device_augmentation import (DeviceSpatialAugmentation, SpatialAugmentationConfig, SpatialParameters,
                                       apply_spatial_augmentation, sample_spatial_parameters)
from nnssl.integration.pretraining_loader import PretrainingDataLoader, crop_into, shared_zeros

READ, PATCH = (30, 34, 28), (16, 18, 14)


def _bgv2_spatial() -> SpatialTransform:
    """nnssl's CPU pretraining SpatialTransform with rotation and scaling forced on (p 1)."""
    return SpatialTransform(PATCH, 0, False, p_rotation=1, rotation=PRETRAINING_ROTATION, p_scaling=1,
                            scaling=PRETRAINING_SCALING, p_synchronize_scaling_across_axes=1,
                            border_mode_seg="constant", padding_value_seg=-1)


def _regions(generator: torch.Generator) -> torch.Tensor:
    """A blocky (1, *READ) region map with labels 0..2 and a padded (-1) slab, as the loader delivers it."""
    coarse = torch.randint(0, 3, (1, 1, 8, 9, 7), generator=generator).float()
    regions = torch.nn.functional.interpolate(coarse, size=READ, mode="nearest")[0].short()
    regions[:, :4] = -1
    return regions


def _parameters(matrix: np.ndarray, resampled: bool, mirrored=(False, False, False)) -> SpatialParameters:
    return SpatialParameters(torch.from_numpy(matrix)[None], torch.tensor([resampled]), torch.tensor([mirrored]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampled_patch_and_region_map_match_batchgeneratorsv2(seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, *READ, generator=generator)
    regions = _regions(generator)
    transform = _bgv2_spatial()
    np.random.seed(seed)
    params = transform.get_parameters(image=image)
    expected_image = transform._apply_to_image(image, **params)
    expected_regions = transform._apply_to_segmentation(regions, **params)
    expected_regions[expected_regions == -1] = 0  # RemoveLabelTansform(-1, 0)

    image_out, regions_out = apply_spatial_augmentation(image[None], _parameters(params["affine"], True), PATCH,
                                                        regions[None])
    assert torch.allclose(image_out[0], expected_image, atol=1e-4)
    assert (regions_out[0] == expected_regions).float().mean() > 0.999  # ties at exact label boundaries may differ
    assert regions_out.min() >= 0


def test_unresampled_patch_is_bgv2s_centre_crop_and_flip():
    image = torch.randn(1, *READ)
    transform = SpatialTransform(PATCH, 0, False)
    expected = transform(image=image.clone())["image"].flip(1, 3)
    out, _ = apply_spatial_augmentation(image[None], _parameters(np.diag([-1.0, 1.0, -1.0]), False,
                                                                 (True, False, True)), PATCH)
    assert torch.equal(out[0], expected)


def test_mirroring_inside_a_resampling_equals_flipping_the_result():
    image = torch.randn(1, 1, *READ)
    rotation = torch.tensor([[1.0, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]],
                            dtype=torch.float64)
    plain, _ = apply_spatial_augmentation(image, SpatialParameters(rotation[None], torch.tensor([True]),
                                                                   torch.zeros(1, 3, dtype=torch.bool)), PATCH)
    flipped, _ = apply_spatial_augmentation(image, SpatialParameters((rotation @ torch.diag(
        torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)))[None], torch.tensor([True]),
        torch.tensor([[False, True, False]])), PATCH)
    assert torch.allclose(flipped, plain.flip(3), atol=1e-5)


def test_images_and_region_maps_get_the_same_transform():
    """An image that IS the region map stays consistent with the transformed region map wherever it is unambiguous."""
    coarse = torch.randint(1, 3, (1, 1, 8, 9, 7), generator=torch.Generator().manual_seed(5)).float()
    regions = torch.nn.functional.interpolate(coarse, size=READ, mode="nearest")[0].short()  # labels 1 and 2
    image = regions.float()
    augmentation = DeviceSpatialAugmentation(PATCH, SpatialAugmentationConfig(p_rotation=1, p_scaling=1), seed=3)
    images_out, regions_out = augmentation(torch.stack([image] * 4), torch.stack([regions] * 4))
    # interpolated values within 1e-3 of 1 or 2: every voxel the interpolation reads has that label
    inside = ((images_out - images_out.round()).abs() < 1e-3) & (images_out.round() > 0)
    assert inside.sum() > 1000
    assert torch.equal(regions_out[inside].float(), images_out.round()[inside])
    assert not torch.equal(images_out[0], images_out[1])  # every sample draws its own transform


def test_parameter_distribution_matches_the_cpu_pipeline():
    config = SpatialAugmentationConfig()
    params = sample_spatial_parameters(40000, config, torch.Generator().manual_seed(0))
    matrices, mirrored = params.matrices, params.mirrored
    scales = torch.linalg.det(matrices).abs() ** (1 / 3)
    scaled = (scales - 1).abs() > 1e-9
    rotation = matrices / scales[:, None, None] @ torch.diag_embed(1 - 2.0 * mirrored.double())
    rotated = (rotation - torch.eye(3, dtype=torch.float64)).abs().amax((1, 2)) > 1e-9
    assert abs(rotated.double().mean() - 0.2) < 0.01 and abs(scaled.double().mean() - 0.2) < 0.01
    assert abs((rotated & scaled).double().mean() - 0.04) < 0.005  # drawn independently
    assert torch.equal(params.resampled, rotated | scaled)
    assert scales[scaled].min() >= 0.7 and scales[scaled].max() <= 1.4
    assert abs(scales[scaled].mean() - 1.05) < 0.01  # U(0.7, 1.4), one factor for all axes
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(40000, 3, 3))
    angle_x = torch.atan2(rotation[rotated][:, 2, 1], rotation[rotated][:, 2, 2])  # Rz Ry Rx: the x angle
    assert angle_x.abs().max() <= math.radians(30) + 1e-9 and abs(angle_x.std() - math.radians(30) / 3 ** 0.5) < 0.01
    assert (mirrored.double().mean(0) - 0.5).abs().max() < 0.01


def test_mirroring_only_on_allowed_axes_and_seeded_draws_repeat():
    config = SpatialAugmentationConfig(mirror_axes=(1,))
    params = sample_spatial_parameters(2000, config, torch.Generator().manual_seed(1))
    assert not params.mirrored[:, [0, 2]].any() and params.mirrored[:, 1].any()
    images = torch.randn(3, 1, *READ)
    first = DeviceSpatialAugmentation(PATCH, SpatialAugmentationConfig(), seed=7)(images)[0]
    again = DeviceSpatialAugmentation(PATCH, SpatialAugmentationConfig(), seed=7)(images)[0]
    other = DeviceSpatialAugmentation(PATCH, SpatialAugmentationConfig(), seed=8)
    assert torch.equal(first, again)
    assert any(not torch.equal(first, other(images)[0]) for _ in range(5))


@pytest.mark.parametrize("bbox", [[[2, 12], [0, 9], [3, 8]], [[-4, 6], [5, 20], [-2, 14]],
                                  [[-3, 17], [-1, 16], [0, 4]]])
def test_crop_into_equals_nnunets_crop_and_pad(bbox):
    array = np.random.default_rng(0).standard_normal((2, 14, 15, 12)).astype(np.float32)
    out = torch.full((2, *[b - a for a, b in bbox]), 7.0)
    crop_into(out, array, bbox, -1)
    assert torch.equal(out, torch.from_numpy(crop_and_pad_nd(array, bbox, -1)))


def test_pretraining_loader_reads_what_nnunets_loader_reads(tmp_path):
    rng = np.random.default_rng(0)
    for case in range(2):
        image = rng.standard_normal((1, 20, 22, 18)).astype(np.float32)
        seg = rng.integers(0, 3, (1, 20, 22, 18)).astype(np.int16)
        nnUNetDatasetBlosc2.save_case(image, seg, {"class_locations": {}}, str(tmp_path / f"case{case}"),
                                      chunks=(1, 20, 22, 18), blocks=(1, 8, 8, 8), chunks_seg=(1, 20, 22, 18),
                                      blocks_seg=(1, 8, 8, 8))
    labels = LabelManager({"background": 0, "anatomy": 1, "anonymised": 2}, regions_class_order=None)
    dataset = nnUNetDatasetBlosc2(str(tmp_path))
    batches = {}
    for name, loader in {"stock": nnUNetDataLoader(dataset, 3, (26, 24, 30), (16, 16, 16), labels),
                         "with_regions": PretrainingDataLoader(dataset, 3, (26, 24, 30), (16, 16, 16), labels),
                         "without": PretrainingDataLoader(dataset, 3, (26, 24, 30), (16, 16, 16), labels,
                                                          read_region_map=False),
                         "private": PretrainingDataLoader(dataset, 3, (26, 24, 30), (16, 16, 16), labels,
                                                          read_region_map=False, shared_batches=False)}.items():
        np.random.seed(4)
        batches[name] = next(loader)
    assert torch.equal(batches["with_regions"]["data"], batches["stock"]["data"])
    assert torch.equal(batches["without"]["data"], batches["stock"]["data"])
    assert torch.equal(batches["with_regions"]["target"], batches["stock"]["target"])
    assert batches["without"]["target"] is None
    assert batches["without"]["data"].is_shared()  # handed to the trainer by a worker without another copy
    assert torch.equal(batches["private"]["data"], batches["stock"]["data"])
    assert not batches["private"]["data"].is_shared()


def test_shared_zeros_are_zeros_in_shared_memory():
    tensor = shared_zeros((2, 3, 4), torch.int16)
    assert tensor.is_shared() and tensor.dtype == torch.int16 and tensor.shape == (2, 3, 4)
    assert not tensor.any()


def test_augmentation_ignores_an_enclosing_bf16_autocast():
    """The train step runs compute_loss under bf16 autocast (CUDA); sampling coordinates must stay float32."""
    images = torch.randn(4, 1, *READ)
    config = SpatialAugmentationConfig(p_rotation=1, p_scaling=1)
    plain = DeviceSpatialAugmentation(PATCH, config, seed=2)(images)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = DeviceSpatialAugmentation(PATCH, config, seed=2)(images)[0]
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
