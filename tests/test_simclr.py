"""SimCLR: the two overlapping views, the embedding for both families, the stem+encoder export, the batch-size check,
the refusal of the other family's plans, and both trainers through every entry point (``check_pretraining_pair``)."""

import numpy as np
import pytest
import torch

from conftest import tiny_network
from method_pairs import build_trainer, check_pretraining_pair, train_with_a_batch_of_one
from test_primus_e2e import fresh_tiny_primus
from nnssl.architectures import network_from_plans, transferable_prefixes
from nnssl.citations import apa_lines
from nnssl.errors import UserError
from nnssl.finetuning.adaptation_plan import nnunet_architecture
from nnssl.methods.contrastive import nt_xent_loss
from nnssl.methods.encoder_features import encoder_state_dict
from nnssl.methods.simclr import SimCLRGeometry, SimCLRModel, simclr_transforms
from nnssl.trainers.simclr import (PrimusSimCLRPretrainTrainer, SimCLRPretrainTrainer, SimCLRPretrainTrainer_t01,
                                   check_contrastive_batch_size)

TINY = SimCLRPretrainTrainer.tiny_geometry
GEOMETRIES = [TINY, SimCLRPretrainTrainer.geometry, SimCLRGeometry((40, 30, 20), (16, 12, 20), 0.75)]


def crop_of(image: torch.Tensor, start, size) -> torch.Tensor:
    return image[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, size))]


# ---------------------------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_two_views_lie_in_the_patch_and_overlap_by_the_minimum_on_every_axis(geometry):
    np.random.seed(0)
    size, patch = np.array(geometry.crop_size), np.array(geometry.patch_size)
    shifts = []
    for _ in range(300):
        starts = geometry.random_view_starts()
        assert starts.shape == (2, 3) and (starts >= 0).all() and (starts + size <= patch).all()
        overlap = size - np.abs(starts[0] - starts[1])
        assert (overlap >= geometry.min_overlap * size).all()
        shifts.append(np.abs(starts[0] - starts[1]))
    # the whole allowed range is used (where the patch leaves room to shift)
    room = np.minimum(geometry.max_shift, patch - size)
    assert (np.max(shifts, axis=0) == room).all()


def test_view_transform_cuts_two_views_whose_content_is_the_patch_at_their_corners():
    np.random.seed(1)
    image = torch.arange(np.prod(TINY.patch_size), dtype=torch.float32).view(1, *TINY.patch_size)
    views = simclr_transforms(TINY, augment=False)(image=image.clone())["image"]
    assert views.shape == (2, 1, 32, 32, 32)
    corners = [np.unravel_index(int(v[0, 0, 0, 0]), TINY.patch_size) for v in views]
    for view, corner in zip(views, corners):
        assert torch.equal(view, crop_of(image, corner, TINY.crop_size))
    assert (TINY.crop_size - np.abs(np.subtract(*corners)) >= 16).all()


def test_training_views_are_augmented_each_on_its_own():
    same_place = SimCLRGeometry(TINY.patch_size, TINY.crop_size, min_overlap=1.0)  # both views cut at one corner
    image = torch.randn(1, *TINY.patch_size)
    differ = []
    for seed in range(4):
        np.random.seed(seed)
        torch.manual_seed(seed)
        plain = simclr_transforms(same_place, augment=False)(image=image.clone())["image"]
        augmented = simclr_transforms(same_place, augment=True)(image=image.clone())["image"]
        assert torch.equal(plain[0], plain[1]) and augmented.shape == plain.shape
        differ.append(not torch.equal(augmented[0], augmented[1]))
    assert sum(differ) >= 3  # mirroring alone draws different flips for the two views with p = 7/8


@pytest.mark.parametrize("patch, crop, overlap", [((64, 64), (32, 32), 0.5), ((64, 64, 32), (32, 32, 40), 0.5),
                                                  ((64, 64, 32), (32, 32, 32), 1.5)])
def test_invalid_geometries_are_rejected(patch, crop, overlap):
    with pytest.raises(ValueError):
        SimCLRGeometry(patch, crop, overlap)


def test_geometry_follows_the_plans_patch():
    assert SimCLRPretrainTrainer.select_geometry((160, 160, 160)) == SimCLRGeometry((192, 192, 64), (64, 64, 64))
    assert PrimusSimCLRPretrainTrainer.select_geometry((64, 64, 64)).crop_size == (32, 32, 32)
    assert SimCLRPretrainTrainer.temperature == 0.5 and SimCLRPretrainTrainer_t01.temperature == 0.1
    assert SimCLRPretrainTrainer.recipe.gradient_clip_norm == 0.1  # the reference SimCLRTrainer's clipping


# ------------------------------------------------------------------------------------------------ model, export
@pytest.mark.parametrize("family", ["resenc", "primus"])
def test_embedding_widths_gradients_and_export_that_loads_strictly(family):
    torch.manual_seed(0)
    build, crop, width = {"resenc": (tiny_network, 32, 8 + 16 + 32 + 64 + 64), "primus": (fresh_tiny_primus, 64, 96)}[
        family]
    model = SimCLRModel(build())
    assert model.projector[0].in_features == width and model.projector[-1].out_features == 128
    embeddings = model(torch.randn(6, 1, crop, crop, crop)).view(3, 2, -1)
    assert embeddings.shape == (3, 2, 128)
    nt_xent_loss(embeddings[:, 0], embeddings[:, 1]).backward()
    # every trainable parameter gets a gradient (DDP without find_unused_parameters), the encoder among them
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())
    prefixes = tuple(f"network.{prefix}." for prefix in transferable_prefixes(model.network))
    assert {n for n in trainable if n.startswith(prefixes)} == {n for n, _ in model.named_parameters()
                                                                 if n.startswith(prefixes)}
    exported = encoder_state_dict(model.network)
    fresh = build()
    assert set(exported) == {k for k in fresh.state_dict() if k.startswith(tuple(p[len("network."):]
                                                                                  for p in prefixes))}
    for prefix in transferable_prefixes(fresh):
        fresh.get_submodule(prefix).load_state_dict(
            {k[len(prefix) + 1:]: v for k, v in exported.items() if k.startswith(prefix + ".")}, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in exported.items())


def test_a_global_batch_of_one_is_refused():
    check_contrastive_batch_size("T", 2, "plans", "3d_fullres")
    with pytest.raises(UserError, match="needs at least 2 samples in the global batch .* the plans P have batch_size "
                                        "1 in configuration 3d_fullres. Set \"batch_size\" to 2 or more"):
        check_contrastive_batch_size("T", 1, "P", "3d_fullres")


# ------------------------------------------------------------------------------------------------ stock command
@pytest.mark.parametrize("trainer, family", [("SimCLRPretrainTrainer", "resenc"),
                                             ("PrimusSimCLRPretrainTrainer", "primus")])
@pytest.mark.slow
def test_simclr_pair_through_every_entry_point(tiny_pretraining_dataset, tmp_path, trainer, family):
    """nnUNetv2_train, 2-rank nnssl_train, nnssl_prepare_finetune, fine-tuning. The plans' batch of 2 leaves one
    sample per rank: NT-Xent refuses a batch without negatives, so the 2-rank run trains only because each rank
    contrasts with the other rank's views."""
    checkpoint = check_pretraining_pair(tiny_pretraining_dataset, trainer, family, tmp_path)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert plan["pretrain_plan"]["configurations"]["3d_fullres"]["patch_size"] == [32, 32, 32]
    arch = nnunet_architecture(plan)
    fresh = network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 1)
    assert set(checkpoint["network_weights"]) == set(encoder_state_dict(fresh))  # stem + encoder only
    assert any(k.startswith("projector.") for k in checkpoint["nnssl_pretraining_weights"])
    assert any("Contrastive Learning of Visual" in line for line in apa_lines(checkpoint["citations"]))
    assert np.isfinite(checkpoint["logging"]["train_losses"]).all()
    if family == "primus":  # built at the view size: 4^3 tokens of 8^3 voxels
        assert plan["architecture_plans"]["arch_kwargs"]["input_shape"] == [32, 32, 32]
        assert checkpoint["network_weights"]["eva.pos_embed"].shape == fresh.eva.pos_embed.shape == (1, 64, 96)
        assert checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["patch_size"] == [64, 64, 64]
    else:
        assert (plan["key_to_encoder"], plan["key_to_stem"]) == ("encoder.stages", "encoder.stem")


def test_batch_of_one_is_refused_by_nnunetv2_train(tiny_pretraining_dataset):
    result = train_with_a_batch_of_one(tiny_pretraining_dataset, "SimCLRPretrainTrainer")
    assert result.returncode != 0
    assert ("SimCLRPretrainTrainer needs at least 2 samples in the global batch (NT-Xent contrasts each sample with "
            "the others), but the plans nnsslPlansTinyBatch1 have batch_size 1 in configuration 3d_fullres") in \
        result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("trainer, plans, message", [
    (PrimusSimCLRPretrainTrainer, "nnsslPlansTiny", "PrimusSimCLRPretrainTrainer pretrains a Primus, but the plans "
     "nnsslPlansTiny build dynamic_network_architectures.architectures.unet.ResidualEncoderUNet. Plan the dataset "
     "with -pl nnsslPlannerPrimus"),
    (SimCLRPretrainTrainer, "nnsslPlansPrimusTiny", "SimCLRPretrainTrainer pretrains a ResEnc U-Net, but the plans "
     "nnsslPlansPrimusTiny build dynamic_network_architectures.architectures.primus.Primus: use "
     "PrimusSimCLRPretrainTrainer")])
def test_each_trainer_refuses_the_other_familys_plans(tiny_pretraining_dataset, trainer, plans, message):
    with pytest.raises(UserError) as error:
        build_trainer(tiny_pretraining_dataset, trainer, plans)
    assert message in str(error.value)
