"""AMAES: artefact transforms, input-only augmentation with a clean target, light decoder, masking, stock run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from conftest import assert_encoder_only_checkpoint, pretrain_smoke, tiny_network
from nnssl.citations import apa_lines
from nnssl.methods.amaes import (AMAESModel, BiasFieldTransform, CarryCleanTarget, GibbsRingingTransform,
                                 LightweightDecoder, MotionGhostingTransform, MultiplicativeGaussianNoiseTransform,
                                 PerAxisZoom, amaes_input_augmentation, augmentation_reversal_loss,
                                 augmentation_reversal_transforms, split_input_and_target)
from nnssl.augmentation import PRETRAINING_ROTATION, spatial_transforms
from nnssl.methods.masking import BlockMaskSampler, upsample_mask

# AMAES, Appendix B, Table 5: p_sample of every input-only augmentation
PAPER_PROBABILITIES = {GaussianBlurTransform: 0.1, GaussianNoiseTransform: 0.2,
                       MultiplicativeGaussianNoiseTransform: 0.2, GammaTransform: 0.2, MotionGhostingTransform: 0.2,
                       BiasFieldTransform: 0.33, GibbsRingingTransform: 0.2, SimulateLowResolutionTransform: 0.1}


def seed(value: int = 0) -> None:
    torch.manual_seed(value)
    np.random.seed(value)


def band_energy(image: torch.Tensor, axis: int, low: float, high: float) -> float:
    """Spectral energy along ``axis`` at |frequency| in (low, high] cycles per voxel."""
    frequencies = torch.fft.fftfreq(image.shape[axis]).abs()
    selected = ((frequencies > low) & (frequencies <= high)).nonzero().flatten()
    return torch.fft.fft(image.double(), dim=axis).index_select(axis, selected).abs().square().sum().item()


# ---------------------------------------------------------------------------------------------- probabilities
def test_each_input_only_augmentation_has_the_paper_probability_over_many_draws():
    seed()
    pipeline = amaes_input_augmentation()
    assert sorted(type(t.transform).__name__ for t in pipeline.transforms) == sorted(
        c.__name__ for c in PAPER_PROBABILITIES)
    for wrapped in pipeline.transforms:
        expected = PAPER_PROBABILITIES[type(wrapped.transform)]
        assert wrapped.apply_probability == expected
        draws = [wrapped.get_parameters(image=None)["apply_transform"] for _ in range(4000)]
        assert abs(np.mean(draws) - expected) < 0.025, type(wrapped.transform).__name__


def test_gamma_inverts_with_p_001_and_low_resolution_zooms_each_axis_with_p_033():
    transforms = {type(t.transform): t.transform for t in amaes_input_augmentation().transforms}
    assert transforms[GammaTransform].p_invert_image == 0.01
    zoom = transforms[SimulateLowResolutionTransform].scale
    assert isinstance(zoom, PerAxisZoom) and not transforms[SimulateLowResolutionTransform].synchronize_axes
    seed()
    factors = np.array([zoom() for _ in range(4000)])
    zoomed = factors < 1
    assert abs(zoomed.mean() - 0.33) < 0.025
    assert factors[zoomed].min() >= 0.5 and factors[zoomed].max() < 1


# ------------------------------------------------------------------------------------------- artefact semantics
def test_motion_ghosting_replicates_structure_at_multiples_of_n_over_r():
    image = torch.zeros(1, 24, 6, 5)
    image[0, 5, 2, 3] = 1.0
    out = MotionGhostingTransform()._apply_to_image(image.clone(), axis=1, alpha=0.9, repetitions=4)
    ghost = -(1 - 0.9) / 4
    expected = torch.zeros_like(image)
    expected[0, [5, 11, 17, 23], 2, 3] = ghost
    expected[0, 5, 2, 3] += 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_motion_ghosting_with_random_parameters_keeps_shape_and_stays_close():
    seed()
    image = torch.randn(1, 16, 16, 16)
    transform = MotionGhostingTransform()
    params = transform.get_parameters(image=image)
    assert 1 <= params["axis"] <= 3 and 0.85 <= params["alpha"] <= 0.95 and 2 <= params["repetitions"] <= 11
    out = transform(image=image.clone())["image"]
    assert out.shape == image.shape and out.dtype == image.dtype and not torch.equal(out, image)
    assert (out - image).abs().max() < 0.5 * image.abs().max()  # faint ghosts, not a new image


def test_gibbs_ringing_truncates_k_space_and_rings_at_edges():
    step = torch.zeros(1, 64, 4, 4)
    step[:, 16:48] = 1.0
    out = GibbsRingingTransform()._apply_to_image(step.clone(), axis=1, keep_fraction=0.5)
    assert band_energy(out, 1, 0.25, 0.5) < 1e-10 * band_energy(step, 1, 0.25, 0.5)  # high frequencies removed
    assert band_energy(out, 1, -1, 0.2) == pytest.approx(band_energy(step, 1, -1, 0.2), rel=1e-6)  # low kept
    assert out.max() > 1.05 and out.min() < -0.05  # overshoot and undershoot next to the edges: ringing
    constant = torch.full((1, 8, 8, 8), 3.0)
    torch.testing.assert_close(GibbsRingingTransform()(image=constant.clone())["image"], constant)


def test_bias_field_is_a_smooth_positive_gain_above_the_minimum():
    seed()
    image = torch.rand(1, 32, 32, 32) + 1
    image[0, 0, 0, 0] = 0.0  # the minimum: background
    transform = BiasFieldTransform(max_log_gain=0.3, control_points=3)
    out = transform(image=image.clone())["image"]
    assert out.min() == 0.0
    field = out[image > 0] / image[image > 0]
    assert field.min() >= math.exp(-0.3) - 1e-5 and field.max() <= math.exp(0.3) + 1e-5
    assert field.std() > 0.01  # not a constant rescaling
    gain = out[:, 1:, 1:, 1:] / image[:, 1:, 1:, 1:]
    slope_bound = 2 * 0.3 / ((32 - 1) / (3 - 1)) * math.exp(0.3)  # largest log-gain step between control points
    for axis in (1, 2, 3):
        assert gain.diff(dim=axis).abs().max() <= slope_bound + 1e-4  # smooth: no voxel-scale variation


def test_multiplicative_noise_scales_with_intensity():
    seed()
    image = torch.cat([torch.zeros(1, 8, 8, 8), torch.full((1, 8, 8, 8), 10.0)], dim=1)
    out = MultiplicativeGaussianNoiseTransform(sigma_range=(0.01, 0.01))(image=image.clone())["image"]
    assert torch.equal(out[:, :8], image[:, :8])
    relative = out[:, 8:] / 10 - 1
    assert 0.007 < relative.std() < 0.013


# ------------------------------------------------------------------------------------- clean target in the pipeline
def forced_input_augmentation() -> ComposeTransforms:
    """Every input-only augmentation applied (probability 1), to make sure the target sees none of them."""
    return ComposeTransforms([t.transform for t in amaes_input_augmentation().transforms])


def test_input_only_augmentations_leave_the_carried_target_untouched():
    seed()
    image = torch.randn(1, 24, 24, 24)
    original = image.clone()
    out = CarryCleanTarget(forced_input_augmentation())(image=image, segmentation=None)["image"]
    inputs, target = split_input_and_target(out[None], 1)
    assert torch.equal(target[0], original) and torch.equal(image, original)
    assert (inputs[0] - original).abs().mean() > 0.01


def test_target_is_the_spatially_augmented_image_input_and_target_share_the_geometry():
    seed()
    image = F.interpolate(torch.randn(1, 1, 5, 5, 5), size=(40, 40, 40), mode="trilinear")[0]  # smooth anatomy
    segmentation = torch.zeros(1, 40, 40, 40, dtype=torch.int16)
    for trial in range(6):
        seed(trial)
        spatial = spatial_transforms((32, 32, 32), PRETRAINING_ROTATION, (0, 1, 2))
        expected = spatial(image=image.clone(), segmentation=segmentation.clone())["image"]
        seed(trial)
        out = augmentation_reversal_transforms((32, 32, 32), PRETRAINING_ROTATION, (0, 1, 2))(
            image=image.clone(), segmentation=segmentation.clone())
        assert out["image"].shape == (2, 32, 32, 32) and out["segmentation"].shape == (1, 32, 32, 32)
        torch.testing.assert_close(out["image"][1:], expected)
        assert torch.corrcoef(out["image"].flatten(1))[0, 1] > 0.8  # the degraded input is aligned with it


def test_validation_transforms_carry_an_identical_target():
    from nnssl.trainers.amaes import AMAESPretrainTrainer

    image = torch.randn(1, 16, 16, 16)
    out = AMAESPretrainTrainer.get_validation_transforms(None)(image=image.clone(),
                                                              segmentation=torch.zeros_like(image))
    assert torch.equal(out["image"], torch.cat([image, image]))


def test_split_rejects_a_batch_without_a_carried_target():
    with pytest.raises(ValueError, match="CarryCleanTarget"):
        split_input_and_target(torch.zeros(2, 1, 4, 4, 4), 1)


# ----------------------------------------------------------------------------------------- network, mask, loss
def test_light_decoder_reads_only_the_bottleneck_and_has_one_conv_per_stage():
    seed()
    network = tiny_network()
    decoder = LightweightDecoder(network.encoder, num_classes=1)
    skips = network.encoder(torch.randn(1, 1, 32, 32, 32))
    reference = decoder(skips)
    assert reference.shape == (1, 1, 32, 32, 32)
    altered = [torch.randn_like(s) for s in skips[:-1]] + [skips[-1]]
    torch.testing.assert_close(decoder(altered), reference)
    assert not torch.allclose(decoder(skips[:-1] + [torch.randn_like(skips[-1])]), reference)
    convs = [m for m in decoder.stages.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == len(decoder.stages) == len(network.encoder.output_channels) - 1
    assert all(c.in_channels == c.out_channels for c in convs)  # nothing concatenated: no skip input


def test_amaes_model_sees_only_visible_tokens_and_exports_only_the_encoder():
    from nnssl.trainers.amaes import AMAESPretrainTrainer

    seed()
    network = tiny_network()
    model = AMAESModel(network).eval()
    mask = BlockMaskSampler((32, 32, 32), AMAESPretrainTrainer.masking).sample(1)
    x = torch.randn(1, 1, 32, 32, 32)
    hidden_changed = x + torch.randn_like(x) * (1 - upsample_mask(mask, x.shape[2:]))
    torch.testing.assert_close(model(hidden_changed, mask), model(x, mask))
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder"}


def test_amaes_masks_4_cubed_tokens_at_ratio_06():
    from nnssl.trainers.amaes import AMAESPretrainTrainer

    masking = AMAESPretrainTrainer.masking
    assert masking.block_size == 4 and masking.ratio_range == (0.6, 0.6)
    mask = BlockMaskSampler((64, 64, 64), masking, seed=1).sample(3)
    assert mask.shape == (3, 1, 16, 16, 16)
    assert ((1 - mask).flatten(1).sum(dim=1) == int(0.6 * 16 ** 3)).all()
    assert not torch.equal(mask[0], mask[1])  # a pattern per sample
    full = upsample_mask(mask, (64, 64, 64))
    blocks = full.view(3, 1, 16, 4, 16, 4, 16, 4)
    assert (blocks.amax(dim=(3, 5, 7)) == blocks.amin(dim=(3, 5, 7))).all()  # constant on every 4^3 token


def test_reversal_loss_scores_every_voxel_and_respects_the_region():
    seed()
    prediction, target = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    torch.testing.assert_close(augmentation_reversal_loss(prediction, target), F.mse_loss(prediction, target))
    region = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    region[:, :, :4] = True
    torch.testing.assert_close(augmentation_reversal_loss(prediction, target, region),
                               F.mse_loss(prediction[:, :, :4], target[:, :, :4]))


def test_s3d_option_keeps_s3d_and_adds_the_reversal_target():
    from nnssl.trainers.amaes import AMAESPretrainTrainer, AugmentationReversalMixin, S3DPretrainTrainer_amaesaug
    from nnssl.trainers.s3d import S3DPretrainTrainer

    assert issubclass(S3DPretrainTrainer_amaesaug, S3DPretrainTrainer)
    assert S3DPretrainTrainer_amaesaug.wrap_network is S3DPretrainTrainer.wrap_network
    assert S3DPretrainTrainer_amaesaug.masking == S3DPretrainTrainer.masking
    assert S3DPretrainTrainer_amaesaug.transferable_state_dict is S3DPretrainTrainer.transferable_state_dict
    assert S3DPretrainTrainer_amaesaug.reconstruction_loss is AugmentationReversalMixin.reconstruction_loss
    assert AMAESPretrainTrainer.reconstruction_loss is not AugmentationReversalMixin.reconstruction_loss
    transforms = S3DPretrainTrainer_amaesaug.get_training_transforms((32, 32, 32), PRETRAINING_ROTATION, None,
                                                                     (0, 1, 2), False)
    out = transforms(image=torch.randn(1, 40, 40, 40), segmentation=torch.zeros(1, 40, 40, 40, dtype=torch.int16))
    assert out["image"].shape == (2, 32, 32, 32)


# ------------------------------------------------------------------------------------------------ stock command
def test_amaes_pretraining_through_nnunetv2_train_exports_an_encoder_checkpoint(tiny_pretraining_dataset):
    out, checkpoint = pretrain_smoke(tiny_pretraining_dataset, "AMAESPretrainTrainer")
    assert_encoder_only_checkpoint(checkpoint)
    assert any(k.startswith("decoder.upsamplers") for k in checkpoint["nnssl_pretraining_weights"])
    assert checkpoint["nnssl_adaptation_plan"]["recommended_downstream_patchsize"] == [64, 64, 64]
    assert any("AMAES" in line for line in apa_lines(checkpoint["citations"]))
    assert (out / "reconstruction_epoch_0000.png").is_file()
