"""VoCo: crop geometry and overlap targets, losses, projector semantics, and a stock nnUNetv2_train run (CPU)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_encoder_only_checkpoint, pretrain_smoke
from nnssl.citations import apa_lines
from nnssl.methods.encoder_features import encoder_only_state_dict
from nnssl.methods.voco import (VoCoGeometry, VoCoModel, VoCoProjector, crop_overlaps, feature_norm,
                                voco_prediction_loss, voco_regularisation_loss, voco_transforms)

GEOMETRIES = [VoCoGeometry((64, 64, 32), (2, 2, 1), 4), VoCoGeometry((12, 9, 8), (3, 3, 2), 6),
              VoCoGeometry((256, 256, 64), (4, 4, 1), 4)]


def base_index_map(geometry: VoCoGeometry) -> np.ndarray:
    """Each voxel of the patch labelled with the index of the base crop painted over it (-1: none)."""
    labels = np.full(geometry.patch_size, -1, dtype=np.int64)
    for index, start in enumerate(geometry.base_crop_starts()):
        labels[tuple(slice(s, s + c) for s, c in zip(start, geometry.crop_size))] = index
    return labels


def brute_force_overlaps(labels: np.ndarray, target_starts: np.ndarray, geometry: VoCoGeometry) -> np.ndarray:
    """Voxel counting: which base crop each voxel of each target crop belongs to."""
    rows = []
    for start in target_starts:
        voxels = labels[tuple(slice(s, s + c) for s, c in zip(start, geometry.crop_size))]
        rows.append(np.bincount(voxels.ravel(), minlength=geometry.num_base_crops) / voxels.size)
    return np.stack(rows)


def tiny_network(features=(8, 16, 32, 64, 64), blocks=(1, 1, 2, 2, 2)):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl.presets import ResEncPreset

    arch = ResEncPreset("t", (64, 64, 64), features, blocks, 2).architecture()
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 1, deep_supervision=False)


# ------------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_base_crops_tile_the_patch_exactly(geometry):
    coverage = np.zeros(geometry.patch_size, dtype=np.int64)
    for start in geometry.base_crop_starts():
        coverage[tuple(slice(s, s + c) for s, c in zip(start, geometry.crop_size))] += 1
    assert (coverage == 1).all()
    assert len(geometry.base_crop_starts()) == geometry.num_base_crops == int(np.prod(geometry.base_crop_count))


def test_openmind_defaults_give_sixteen_64_cubed_crops():
    assert GEOMETRIES[2].crop_size == (64, 64, 64) and GEOMETRIES[2].num_base_crops == 16


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_overlaps_match_brute_force_voxel_count_and_rows_sum_to_one(geometry):
    np.random.seed(0)
    labels = base_index_map(geometry)
    for _ in range(20):
        targets = geometry.random_target_starts()
        assert targets.shape == (geometry.target_crop_count, 3)
        assert ((targets >= 0) & (targets + geometry.crop_size <= geometry.patch_size)).all()
        overlaps = crop_overlaps(targets, geometry.base_crop_starts(), geometry.crop_size)
        np.testing.assert_allclose(overlaps, brute_force_overlaps(labels, targets, geometry), atol=1e-6)
        np.testing.assert_allclose(overlaps.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("patch, grid", [((64, 63, 32), (2, 2, 1)), ((64, 64), (2, 2)), ((64, 64, 32), (0, 2, 1))])
def test_invalid_geometries_are_rejected(patch, grid):
    with pytest.raises(ValueError):
        VoCoGeometry(patch, grid)


def test_crop_transform_cuts_bases_first_and_targets_whose_content_matches_their_overlaps():
    geometry = GEOMETRIES[0]
    labels = base_index_map(geometry)
    image = torch.from_numpy(labels).float()[None]
    out = voco_transforms(geometry, augment=False)(image=image.clone(), segmentation=torch.zeros_like(image))
    crops, overlaps = out["image"], out["segmentation"]
    n_base = geometry.num_base_crops
    assert crops.shape == (n_base + geometry.target_crop_count, 1, 32, 32, 32)
    assert overlaps.shape == (geometry.target_crop_count, n_base) and overlaps.dtype == torch.float32
    for index in range(n_base):
        assert (crops[index] == index).all()  # base crop n holds exactly base region n
    for t in range(geometry.target_crop_count):
        counts = torch.bincount(crops[n_base + t].long().flatten(), minlength=n_base).float() / crops[0].numel()
        torch.testing.assert_close(counts, overlaps[t])


def test_training_crops_are_augmented_independently_and_validation_crops_are_not():
    geometry = GEOMETRIES[0]
    torch.manual_seed(0)
    np.random.seed(0)
    image = torch.randn(1, *geometry.patch_size)
    val = voco_transforms(geometry, augment=False)(image=image.clone(), segmentation=None)["image"]
    train = voco_transforms(geometry, augment=True)(image=image.clone(), segmentation=None)["image"]
    n_base = geometry.num_base_crops
    for index, start in enumerate(geometry.base_crop_starts()):
        expected = image[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, geometry.crop_size))]
        assert torch.equal(val[index], expected)  # validation: plain crops
    changed = [not torch.equal(train[i], val[i]) for i in range(n_base)]
    assert any(changed)  # mirroring alone changes a crop with probability 7/8


# --------------------------------------------------------------------------------------------------------- losses
def test_regularisation_is_one_for_identical_and_zero_for_orthogonal_bases():
    identical = torch.ones(2, 4, 8)
    torch.testing.assert_close(voco_regularisation_loss(identical), torch.tensor(1.0))
    orthogonal = torch.eye(4, 8).expand(2, 4, 8)
    torch.testing.assert_close(voco_regularisation_loss(orthogonal), torch.tensor(0.0))
    anti = torch.stack([torch.eye(2, 8)[0], -torch.eye(2, 8)[0]])[None]  # cosine -1 is clipped by the relu
    torch.testing.assert_close(voco_regularisation_loss(anti), torch.tensor(0.0))


def test_prediction_loss_on_hand_made_embeddings():
    base = torch.eye(4, 8)[None]  # four orthogonal base embeddings
    one_hot = torch.eye(4)[None, :2]  # target t lies entirely in base t
    # perfect prediction: each target equals its base -> similarity equals the overlap, loss ~ 0
    assert voco_prediction_loss(base[:, :2], base, one_hot).item() == pytest.approx(0.0, abs=1e-5)
    # all embeddings identical: every similarity is 1
    overlaps = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    identical = torch.ones(1, 4, 8)
    positive = (-torch.log(overlaps + 1e-6) * overlaps).sum() / overlaps.sum()
    expected = positive + 1.0  # squared similarity 1 on the zero-overlap pairs
    torch.testing.assert_close(voco_prediction_loss(identical[:, :2], identical, overlaps), expected)
    # targets orthogonal to every base: similarity 0, so only the positive term remains
    target = torch.eye(8)[None, 4:6]
    positive = (-torch.log(1 - overlaps + 1e-6) * overlaps).sum() / overlaps.sum()
    torch.testing.assert_close(voco_prediction_loss(target, base, overlaps), positive)


def test_prediction_loss_detaches_the_bases_and_regularisation_does_not():
    torch.manual_seed(0)
    base = torch.randn(2, 4, 16, requires_grad=True)
    target = torch.randn(2, 3, 16, requires_grad=True)
    overlaps = torch.softmax(torch.randn(2, 3, 4), dim=-1)
    voco_prediction_loss(target, base, overlaps).backward()
    assert base.grad is None
    assert target.grad is not None and target.grad.abs().sum() > 0
    voco_regularisation_loss(base).backward()
    assert base.grad is not None and base.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- projector, model
def test_projector_norm_is_per_sample_layer_norm_without_affine_as_the_reference_instance_norm_on_2d():
    torch.manual_seed(0)
    x = torch.randn(5, 2048) * 3 + 1
    norm = feature_norm(2048)
    y = norm(x)
    assert not list(norm.parameters())
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm(x[2:3]), y[2:3])  # independent of the other samples (not a batch norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns that num_features is unused for this input
        reference = nn.InstanceNorm1d(2048, affine=False)(x)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=0)


def test_projector_layout_and_resenc_l_embedding_width():
    layers = list(VoCoProjector(1120))
    assert [type(m).__name__ for m in layers] == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU",
                                                  "Linear"]
    assert layers[0].in_features == 1120 and all(m.out_features == 2048 for m in layers if isinstance(m, nn.Linear))
    resenc_l = tiny_network(features=(32, 64, 128, 256, 320, 320), blocks=(1, 1, 1, 1, 1, 1))
    assert VoCoModel(resenc_l.encoder).projector[0].in_features == 1120


def test_model_embeds_crops_and_exports_only_encoder_keys_that_load_strictly():
    network = tiny_network()
    model = VoCoModel(network.encoder)
    assert model(torch.randn(3, 1, 32, 32, 32)).shape == (3, 2048)
    exported = encoder_only_state_dict(model)
    assert exported and all(k.startswith("encoder.") for k in exported)
    assert set(exported) == {k for k in network.state_dict() if k.startswith("encoder.")}
    fresh = tiny_network()
    fresh.encoder.load_state_dict({k[len("encoder."):]: v for k, v in exported.items()}, strict=True)


def test_trainer_geometry_follows_the_plans_patch():
    from nnssl.trainers.voco import VoCoPretrainTrainer

    assert VoCoPretrainTrainer.select_geometry((160, 160, 160)) == VoCoGeometry((256, 256, 64), (4, 4, 1), 4)
    tiny = VoCoPretrainTrainer.select_geometry((64, 64, 64))
    assert tiny == VoCoGeometry((64, 64, 32), (2, 2, 1), 4) and tiny.crop_size == (32, 32, 32)


# ------------------------------------------------------------------------------------------------ stock command
def test_voco_pretraining_through_nnunetv2_train_exports_an_encoder_checkpoint(tiny_pretraining_dataset):
    _, checkpoint = pretrain_smoke(tiny_pretraining_dataset, "VoCoPretrainTrainer")
    assert_encoder_only_checkpoint(checkpoint)
    assert any(k.startswith("projector.") for k in checkpoint["nnssl_pretraining_weights"])
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert plan["pretrain_plan"]["configurations"]["3d_fullres"]["patch_size"] == [32, 32, 32]
    assert any("VoCo" in line for line in apa_lines(checkpoint["citations"]))
    assert np.isfinite(checkpoint["logging"]["train_losses"][0])
