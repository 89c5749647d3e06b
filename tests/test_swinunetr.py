"""SwinUNETR-style pretraining: views (rotation labels, cut-out masks), loss parts, heads, transfer keys for both
families, the batch-size refusal through nnUNetv2_train, and end-to-end runs of both trainers (CPU)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bad_input_helpers import assert_one_line_error
from conftest import TINY_DATASET, tiny_network
from method_pairs import FAMILY_PLANS, build_trainer, check_pretraining_pair, train_with_a_batch_of_one
from nnssl.citations import apa_lines
from nnssl.errors import UserError
from nnssl.methods.contrastive import DEFAULT_TEMPERATURE
from nnssl.methods.encoder_features import encoder_state_dict
from nnssl.methods.swinunetr import (CutoutConfig, SwinUNETRGeometry, SwinUNETRModel, SwinUNETROutput,
                                     SwinUNETRViewTransform, cut_out, pack_view_targets, sample_cutout_boxes,
                                     split_views, swinunetr_loss_parts, unpack_view_targets)

VIEW = (16, 16, 8)


def fresh_network(family: str):
    """A fresh plain network of the tiny preset of ``family``, a Primus built for the tiny plans' 32^3 views."""
    if family == "resenc":
        return tiny_network()
    from nnssl.architectures import network_from_plans
    from nnssl.presets import PRIMUS_TINY

    arch = PRIMUS_TINY.architecture((32, 32, 32))
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 1)


def asymmetric_image(shape=VIEW) -> torch.Tensor:
    """Every voxel distinct, so each rotation gives a different array."""
    return torch.arange(math.prod(shape), dtype=torch.float32).view(1, *shape)


# ---------------------------------------------------------------------------------------------------------- views
def test_views_are_the_crop_rotated_by_their_labels_and_every_label_occurs():
    np.random.seed(0)
    image = asymmetric_image()
    seen = set()
    for _ in range(12):
        out = SwinUNETRViewTransform()(image=image.clone())
        assert out["image"].shape == (2, 2, 1, *VIEW) and out["segmentation"].dtype == torch.uint8
        rotations, masks = unpack_view_targets(out["segmentation"][None], VIEW)
        for view in range(2):
            k = int(rotations[0, view])
            assert torch.equal(out["image"][view, 1], torch.rot90(image, k, (1, 2)))  # the clean target
            for other in set(range(4)) - {k}:
                assert not torch.equal(out["image"][view, 1], torch.rot90(image, other, (1, 2)))
            seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_cut_out_input_differs_from_the_clean_view_exactly_inside_the_mask():
    np.random.seed(1)
    image = torch.full((1, 32, 32, 32), -5.0)
    out = SwinUNETRViewTransform()(image=image)
    _, masks = unpack_view_targets(out["segmentation"][None], (32, 32, 32))
    for view in range(2):
        cut, clean, mask = out["image"][view, 0, 0], out["image"][view, 1, 0], masks[0, view]
        assert torch.equal(cut[~mask], clean[~mask])
        # noise lies in [0, 1] and the other view's content is -5 here: a replaced voxel is -5 only if the donor pass
        # hit it, so noise voxels are exactly the replaced voxels that changed
        changed = cut != clean
        assert bool((changed <= mask).all()) and bool(((cut[changed] >= 0) & (cut[changed] <= 1)).all())


def test_cut_out_fills_noise_then_donor_boxes():
    rng = np.random.default_rng(3)
    view, donor = torch.full((1, 40, 40, 40), -5.0), torch.full((1, 40, 40, 40), 7.0)
    fractions = []
    for _ in range(10):
        cut, mask = cut_out(view, donor, CutoutConfig(), rng)
        values = cut[0][mask]
        assert bool((((values >= 0) & (values <= 1)) | (values == 7)).all())
        assert bool((cut[0][~mask] == -5).all())
        fractions.append(float(mask.float().mean()))
        assert float((cut == 7).float().mean()) > 0 or float(mask.float().mean()) < 0.01
    # two passes of at most 30 % each (the last box of a pass may overshoot by one box of up to 10^3 voxels)
    assert 0 < min(fractions) and max(fractions) <= 0.6 + 2 * 1000 / 40 ** 3


def test_cutout_boxes_have_the_configured_edges_and_cover_the_drawn_fraction():
    rng = np.random.default_rng(0)
    shape = np.array([80, 80, 40])
    config = CutoutConfig()
    for _ in range(20):
        boxes = sample_cutout_boxes(shape, config, rng)
        for box in boxes:
            sizes = np.array([b.stop - b.start for b in box])
            stops = np.array([b.stop for b in box])
            assert ((sizes >= (shape * 0.05).astype(int)) | (stops == shape)).all()
            assert (sizes <= (shape * 0.25).astype(int)).all() and (stops <= shape).all()
        if boxes:  # the last box brought the covered count over the drawn fraction, which is at most 30 %
            covered = sum(math.prod(b.stop - b.start for b in box) for box in boxes)
            last = math.prod(b.stop - b.start for b in boxes[-1])
            assert covered - last < 0.3 * shape.prod()


def test_targets_pack_and_unpack():
    rotations = torch.tensor([3, 1])
    masks = torch.rand(2, *VIEW) > 0.5
    packed = torch.stack([pack_view_targets(rotations, masks)] * 3)  # the loader's batch of 3 samples
    out_rotations, out_masks = unpack_view_targets(packed, VIEW)
    assert torch.equal(out_rotations, rotations.expand(3, 2)) and torch.equal(out_masks, masks.expand(3, *masks.shape))


def test_views_are_flattened_sample_by_sample():
    data = torch.arange(3 * 2 * 2).float().view(3, 2, 2, 1, 1, 1, 1)
    inputs, clean = split_views(data)
    assert inputs.flatten().tolist() == [0, 2, 4, 6, 8, 10] and clean.flatten().tolist() == [1, 3, 5, 7, 9, 11]


# --------------------------------------------------------------------------------------------------------- losses
def test_loss_parts_on_hand_made_inputs():
    rotations = torch.tensor([0, 3, 2, 1])  # two samples, two views each
    clean = torch.zeros(4, 1, 2, 2, 2)
    reconstruction = torch.full_like(clean, 0.5)
    reconstruction[0] = 2.5
    contrast = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # views agree, samples orthogonal
    perfect = F.one_hot(rotations, 4).float() * 100
    parts = swinunetr_loss_parts(SwinUNETROutput(perfect, contrast, reconstruction), rotations, clean)
    assert parts["rotation"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["reconstruction"].item() == pytest.approx((2.5 + 3 * 0.5) / 4)
    t = DEFAULT_TEMPERATURE  # candidates of an anchor: its positive (cosine 1) and two negatives (cosine 0)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert parts["contrast"].item() == pytest.approx(expected, rel=1e-5)
    uniform = swinunetr_loss_parts(SwinUNETROutput(torch.zeros(4, 4), contrast, clean), rotations, clean)
    assert uniform["rotation"].item() == pytest.approx(math.log(4), rel=1e-6) and uniform["reconstruction"] == 0
    swapped = contrast[[1, 0, 3, 2]]  # order within a pair does not matter, across pairs it does
    assert swinunetr_loss_parts(SwinUNETROutput(perfect, swapped, clean), rotations, clean)["contrast"].item() == \
        pytest.approx(expected, rel=1e-5)
    mixed = contrast[[0, 2, 1, 3]]
    assert swinunetr_loss_parts(SwinUNETROutput(perfect, mixed, clean), rotations, clean)["contrast"] > expected + 1


# ---------------------------------------------------------------------------------------------- model, transfer
@pytest.mark.parametrize("family", ["resenc", "primus"])
def test_model_heads_gradients_and_exported_keys_load_strictly_into_a_fresh_stem_and_encoder(family):
    torch.manual_seed(0)
    model = SwinUNETRModel(fresh_network(family))
    x = torch.randn(4, 1, 32, 32, 32)
    output = model(x)
    assert output.rotation_logits.shape == (4, 4) and output.contrast.shape == (4, 512)
    assert output.reconstruction.shape == x.shape
    sum(o.float().mean() for o in output).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}  # DDP needs no unused ones
    exported = encoder_state_dict(model.network)
    stem, encoder = (("encoder.stem", "encoder.stages") if family == "resenc" else ("down_projection", "eva"))
    assert exported and all(k.startswith((stem + ".", encoder + ".")) for k in exported)
    target = fresh_network(family)
    for prefix in (stem, encoder):
        assert all(p.requires_grad for p in model.network.get_submodule(prefix).parameters())  # trained
        part = target.get_submodule(prefix)
        part.load_state_dict({k[len(prefix) + 1:]: v for k, v in exported.items() if k.startswith(prefix + ".")},
                             strict=True)
    assert not any(k.startswith(("rotation_head", "contrast_head", "reconstruction_decoder")) for k in exported)


@pytest.mark.parametrize("family", ["resenc", "primus"])
def test_pooled_heads_read_the_mean_and_token_heads_the_reference_positions(family):
    torch.manual_seed(0)
    network = fresh_network(family)
    x = torch.randn(2, 1, 32, 32, 32)
    for pooled in (True, False):
        model = SwinUNETRModel(network, pooled_heads=pooled).eval()
        with torch.no_grad():
            bottleneck, _ = model.bottleneck_and_reconstruction(x)
            output = model(x)
        positions = bottleneck.flatten(2)
        rotation_input, contrast_input = (positions.mean(2), positions.mean(2)) if pooled else \
            (positions[:, :, 0], positions[:, :, 1])
        torch.testing.assert_close(output.rotation_logits, model.rotation_head(rotation_input))
        torch.testing.assert_close(output.contrast, model.contrast_head(contrast_input))


def test_views_are_the_plans_patch_made_square_or_32_cubed_on_tiny_plans():
    from nnssl.trainers.swinunetr import SwinUNETRPretrainTrainer

    assert SwinUNETRPretrainTrainer.select_geometry((160, 160, 160)).view_size == (160, 160, 160)
    assert SwinUNETRPretrainTrainer.select_geometry((192, 160, 128)).view_size == (160, 160, 128)
    tiny = SwinUNETRPretrainTrainer.select_geometry((64, 64, 64))
    assert tiny.view_size == tiny.patch_size == tiny.crop_size == (32, 32, 32)
    with pytest.raises(ValueError):
        SwinUNETRGeometry((32, 16, 32))


# ------------------------------------------------------------------------------------------------ stock command
def test_a_global_batch_of_one_is_refused_with_the_plans_batch_size(tiny_pretraining_dataset):
    result = train_with_a_batch_of_one(tiny_pretraining_dataset, "SwinUNETRPretrainTrainer")
    assert_one_line_error(result, "SwinUNETRPretrainTrainer needs at least 2 samples in the global batch",
                          "nnsslPlansTinyBatch1 have batch_size 1", "Set \"batch_size\" to 2 or more")



def test_each_trainer_refuses_the_other_familys_plans_and_builds_on_its_own(tiny_pretraining_dataset):
    from nnssl.trainers.swinunetr import PrimusSwinUNETRPretrainTrainer, SwinUNETRPretrainTrainer

    with pytest.raises(UserError, match="PrimusSwinUNETRPretrainTrainer pretrains a Primus, but the plans "
                                        "nnsslPlansTiny build .*ResidualEncoderUNet.* or use SwinUNETRPretrainTrainer"):
        build_trainer(tiny_pretraining_dataset, PrimusSwinUNETRPretrainTrainer, "nnsslPlansTiny")
    with pytest.raises(UserError, match="SwinUNETRPretrainTrainer pretrains a ResEnc U-Net, but the plans "
                                        "nnsslPlansPrimusTiny build .*Primus: use PrimusSwinUNETRPretrainTrainer"):
        build_trainer(tiny_pretraining_dataset, SwinUNETRPretrainTrainer, "nnsslPlansPrimusTiny")
    trainer = build_trainer(tiny_pretraining_dataset, PrimusSwinUNETRPretrainTrainer, "nnsslPlansPrimusTiny")
    assert trainer.recipe.optimizer == "adamw" and trainer.view_size == (32, 32, 32)
    assert build_trainer(tiny_pretraining_dataset, SwinUNETRPretrainTrainer, "nnsslPlansTiny").recipe.optimizer == \
        "sgd"

# ---------------------------------------------------------------------------------------------------- end to end
PART_PREFIXES = ("rotation_head.", "contrast_head.")
TRANSFER_PREFIXES = {"resenc": ("encoder.stem.", "encoder.stages."), "primus": ("down_projection.", "eva.")}


@pytest.mark.parametrize("trainer, family", [("SwinUNETRPretrainTrainer", "resenc"),
                                             ("PrimusSwinUNETRPretrainTrainer", "primus")])
@pytest.mark.slow
def test_pretraining_pair_end_to_end(tiny_pretraining_dataset, trainer, family, tmp_path):
    """nnUNetv2_train, 2 DDP ranks, fine-tuning (``check_pretraining_pair``); then what SwinUNETR's checkpoint holds."""
    checkpoint = check_pretraining_pair(tiny_pretraining_dataset, trainer, family, tmp_path)
    two_rank_folder = tmp_path / "two_rank_results" / TINY_DATASET / f"{trainer}__{FAMILY_PLANS[family]}__3d_fullres"
    assert (two_rank_folder / "fold_all" / "reconstruction_epoch_0001.png").is_file()
    log = "".join(p.read_text() for p in (two_rank_folder / "fold_all").glob("training_log_*.txt"))
    assert "train loss parts: rotation " in log and ", reconstruction " in log
    weights = checkpoint["network_weights"]
    assert weights and all(k.startswith(TRANSFER_PREFIXES[family]) for k in weights)
    assert set(weights) == set(encoder_state_dict(fresh_network(family)))
    pretraining = checkpoint["nnssl_pretraining_weights"]
    assert all(any(k.startswith(p) for k in pretraining) for p in PART_PREFIXES)
    assert any(k.startswith("reconstruction_decoder.") for k in pretraining) == (family == "resenc")
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]  # the tiny plans' views
    assert plan["pretrain_plan"]["configurations"]["3d_fullres"]["patch_size"] == [32, 32, 32]
    if family == "primus":
        assert plan["architecture_plans"]["arch_kwargs"]["input_shape"] == [32, 32, 32]
    assert any("Self-Supervised Pre-Training of Swin" in line for line in apa_lines(checkpoint["citations"]))
