"""VolumeFusion: box sampling, painting and fusion, the Dice + CE loss, the augmentation list, a stock training run."""

import math

import numpy as np
import pytest
import torch

from conftest import pretrain_smoke, tiny_network
from nnssl.citations import apa_lines
from nnssl.methods.volume_fusion import (FusionBoxes, VolumeFusionConfig, VolumeFusionTransform, box_size_range, fuse,
                                         fusion_coefficients, paint_labels, sample_fusion_boxes)

CONFIG = VolumeFusionConfig()
CPU = torch.device("cpu")


def boxes(*specs) -> FusionBoxes:
    """``specs``: (start, size, class) triples, painted in the given order."""
    starts, sizes, classes = zip(*specs)
    return FusionBoxes(np.array(starts), np.array(sizes), np.array(classes))


def test_coefficients_are_evenly_spaced_from_background_to_foreground():
    assert fusion_coefficients(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fusion_coefficients(3).tolist() == [0.0, 0.5, 1.0]


def test_box_sizes_scale_with_the_patch():
    assert [a.tolist() for a in box_size_range((160, 160, 160), CONFIG)] == [[8] * 3, [100] * 3]
    assert [a.tolist() for a in box_size_range((64, 40, 6), CONFIG)] == [[8, 8, 6], [40, 25, 6]]


def test_sampled_boxes_stay_in_range():
    shape, rng = (64, 40, 24), np.random.default_rng(0)
    low, high = box_size_range(shape, CONFIG)
    samples = [sample_fusion_boxes(shape, rng, CONFIG) for _ in range(600)]
    counts = [len(s.classes) for s in samples]
    assert min(counts) == 10 and max(counts) == 39
    sizes = np.concatenate([s.sizes for s in samples])
    starts = np.concatenate([s.starts for s in samples])
    assert (sizes.min(0) == low).all() and (sizes.max(0) == high).all()
    assert (starts >= 0).all() and (starts + sizes <= np.array(shape)).all()
    assert set(np.concatenate([s.classes for s in samples]).tolist()) == set(range(CONFIG.num_classes))


def test_later_boxes_overwrite_earlier_ones_and_the_default_is_background():
    shape = (6, 7, 8)
    labels = paint_labels(shape, boxes(((0, 0, 0), (4, 4, 4), 2), ((2, 2, 2), (3, 3, 3), 4)), CPU)
    expected = torch.zeros(shape, dtype=torch.long)
    expected[:4, :4, :4] = 2
    expected[2:5, 2:5, 2:5] = 4
    assert torch.equal(labels, expected)
    reversed_order = paint_labels(shape, boxes(((2, 2, 2), (3, 3, 3), 4), ((0, 0, 0), (4, 4, 4), 2)), CPU)
    assert (reversed_order[:4, :4, :4] == 2).all() and (reversed_order[4, 4, 4] == 4)


def test_full_volume_box_and_exact_fusion_formula():
    shape = (5, 6, 7)
    rng = torch.Generator().manual_seed(0)
    foreground, background = torch.randn(2, *shape, generator=rng), torch.randn(2, *shape, generator=rng)
    coefficients = fusion_coefficients(5)
    for k in range(5):
        labels = paint_labels(shape, boxes(((0, 0, 0), shape, k)), CPU)
        assert (labels == k).all()
        fused = fuse(foreground, background, labels, coefficients)
        a = coefficients[k]
        assert torch.equal(fused, a * foreground + (1 - a) * background)
    labels = paint_labels(shape, boxes(((0, 0, 0), shape, 4)), CPU)
    assert torch.equal(fuse(foreground, background, labels, coefficients), foreground)
    assert torch.equal(fuse(foreground, background, torch.zeros_like(labels), coefficients), background)


def test_transform_pairs_first_half_with_second_half_and_labels_coefficient_indices():
    images = torch.cat([torch.ones(2, 3, 16, 16, 16), torch.zeros(2, 3, 16, 16, 16)])
    out = VolumeFusionTransform(CONFIG, np.random.default_rng(1))(image=images)
    assert out["image"].shape == (2, 3, 16, 16, 16)
    assert out["segmentation"].shape == (2, 1, 16, 16, 16) and out["segmentation"].dtype == torch.long
    # foreground 1, background 0: every fused voxel equals the coefficient of its label, in every channel
    expected = fusion_coefficients(5)[out["segmentation"]].expand(-1, 3, -1, -1, -1)
    assert torch.equal(out["image"], expected)
    assert not torch.equal(out["segmentation"][0], out["segmentation"][1])  # boxes drawn per pair

    images = torch.randn(4, 1, 12, 12, 12)
    out = VolumeFusionTransform(CONFIG, np.random.default_rng(2))(image=images.clone())
    a = fusion_coefficients(5)[out["segmentation"]]
    assert torch.equal(out["image"], a * images[:2] + (1 - a) * images[2:])
    with pytest.raises(ValueError, match="even number"):
        VolumeFusionTransform(CONFIG, np.random.default_rng(3))(image=torch.zeros(3, 1, 8, 8, 8))


def test_dice_ce_loss_on_hand_made_inputs():
    from nnssl.methods.volume_fusion import volume_fusion_loss

    loss = volume_fusion_loss()
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[:, :, :2] = 1
    # uniform prediction over 2 classes: CE = ln 2; soft Dice per class = 2 * 0.5 * 0.5 / (0.5 + 0.5) = 0.5
    assert loss(torch.zeros(1, 2, 4, 4, 4), target).item() == pytest.approx(math.log(2) - 0.5, abs=1e-4)
    # a confident correct prediction: CE ~ 0, Dice ~ 1 for both classes; the loss is -Dice + CE
    perfect = 50.0 * torch.cat([target == 0, target == 1], dim=1).float()
    assert loss(perfect, target).item() == pytest.approx(-1.0, abs=1e-4)
    # a class absent from the sample and not predicted counts as Dice 1 (do_bg=True, per-sample Dice)
    three = torch.cat([perfect, torch.full_like(perfect[:, :1], -50.0)], dim=1)
    assert loss(three, target).item() == pytest.approx(-1.0, abs=1e-4)


def test_training_augmentation_is_nnunets_intensity_list_without_spatial_transform():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnssl.trainers.volume_fusion import VolumeFusionPretrainTrainer

    pipeline = VolumeFusionPretrainTrainer.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False)
    names = [type(getattr(t, "transform", t)).__name__ for t in pipeline.transforms]
    assert names == ["GaussianNoiseTransform", "GaussianBlurTransform", "MultiplicativeBrightnessTransform",
                     "ContrastTransform", "SimulateLowResolutionTransform", "GammaTransform", "GammaTransform",
                     "MirrorTransform", "RemoveLabelTransform"]
    assert [getattr(t, "apply_probability", None) for t in pipeline.transforms][:7] == [0.1, 0.2, 0.15, 0.15, 0.25,
                                                                                      0.1, 0.3]
    assert not any(isinstance(t, SpatialTransform) for t in pipeline.transforms)
    out = pipeline(image=torch.randn(1, 32, 32, 32), segmentation=torch.zeros(1, 32, 32, 32, dtype=torch.int16))
    assert out["image"].shape == (1, 32, 32, 32)


def test_volume_fusion_pretraining_through_stock_nnunetv2_train(tiny_pretraining_dataset):
    out, checkpoint = pretrain_smoke(tiny_pretraining_dataset, "VolumeFusionPretrainTrainer")
    fresh = tiny_network(num_classes=CONFIG.num_classes)
    fresh.load_state_dict(checkpoint["network_weights"], strict=True)
    assert checkpoint["network_weights"]["decoder.seg_layers.0.weight"].shape[0] == CONFIG.num_classes
    assert checkpoint["nnssl_adaptation_plan"]["key_to_encoder"] == "encoder.stages"
    assert any("MIS-FM" in line for line in apa_lines(checkpoint["citations"]))
    assert np.isfinite(checkpoint["logging"]["train_losses"][0])

    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "the loader draws 2 foreground + 2 background patches per fused batch of 2" in log
