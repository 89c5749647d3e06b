"""nnssl_prepare_finetune -ps: a downstream patch of the user's; a Primus is built for it and its positional
embedding resampled to the new token grid (issue 22)."""

import pytest
import torch

from conftest import write_labeled_dataset
from reference_checkpoints import LAYOUTS, primus
from test_reference_layouts import SMOKE_1
from nnssl.errors import InvalidValueError, UserError
from nnssl.finetuning.adaptation_plan import nnunet_architecture
from nnssl.finetuning.downstream_patch import check_downstream_patch
from nnssl.finetuning.transfer import transfer_pretrained_weights
from nnssl.presets import RESENC_TINY

NEW_PATCH = [48, 32, 40]  # 6 x 4 x 5 tokens of 8^3 instead of the pretraining 8 x 8 x 8
RESAMPLED = ("eva.pos_embed: resampled (1, 512, 96) -> (1, 120, 96) (pretraining patch [64, 64, 64] -> downstream "
             "patch [48, 32, 40], token grid [8, 8, 8] -> [6, 4, 5], trilinear)")


def test_positional_embedding_is_kept_at_the_pretraining_grid_and_resampled_at_another():
    checkpoint = LAYOUTS["mae_primus"].checkpoint()
    weights, plan = checkpoint["network_weights"], checkpoint["nnssl_adaptation_plan"]
    same = primus([64, 64, 64])
    report = transfer_pretrained_weights(same, weights, plan, patch_size=[64, 64, 64])
    assert torch.equal(same.eva.pos_embed, weights["eva.pos_embed"]) and not report.adapted

    arch = nnunet_architecture(plan, NEW_PATCH)
    assert arch["arch_kwargs"]["input_shape"] == NEW_PATCH
    other = primus(NEW_PATCH)
    report = transfer_pretrained_weights(other, weights, plan, patch_size=NEW_PATCH)
    assert other.eva.pos_embed.shape == (1, 6 * 4 * 5, 96) and report.adapted == [RESAMPLED]
    assert torch.equal(other.eva.blocks[0].attn.proj.weight, weights["eva.blocks.0.attn.proj.weight"])


def test_patch_sizes_that_do_not_fit_the_network_are_refused_with_a_fitting_one():
    primus_arch = nnunet_architecture(LAYOUTS["mae_primus"].plan())
    assert check_downstream_patch((48, 32, 40), primus_arch) == NEW_PATCH
    with pytest.raises(InvalidValueError, match=r"\[50, 32, 40\] .* multiple of the Primus patch embedding "
                                                r"\[8, 8, 8\], e\.g\. -ps 48 32 40\."):
        check_downstream_patch([50, 32, 40], primus_arch)
    preset_plan = {**LAYOUTS["mae_primus"].plan(), "architecture_plans": {"arch_class_name": "PrimusM"}}
    assert nnunet_architecture(preset_plan, [128, 128, 64])["arch_kwargs"]["input_shape"] == [128, 128, 64]
    unet_arch = RESENC_TINY.architecture()
    assert check_downstream_patch([96, 32, 48], unet_arch) == [96, 32, 48]
    for bad in ([96, 40, 48], [0, 32, 48], [96, 32]):
        with pytest.raises(InvalidValueError, match=r"U-Net's total stride .* \[16, 16, 16\]"):
            check_downstream_patch(bad, unet_arch)


def test_prepare_finetune_refuses_a_patch_that_does_not_fit_before_any_fingerprinting(nnunet_dirs, tmp_path):
    """(The end-to-end run at a new patch, fine-tuning and prediction included, is
    test_reference_layouts.test_reference_checkpoint_through_prepare_finetune_and_nnunetv2_train.)"""
    from nnssl.plans.prepare_finetune import prepare_finetune

    checkpoint = tmp_path / "primus_mae.pth"
    torch.save(LAYOUTS["mae_primus"].checkpoint(), checkpoint)
    write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 84, "PatchDown", shapes=[(20, 20, 20)], spacings=[(1, 1, 1)])
    with pytest.raises(InvalidValueError, match=r"\[50, 30, 40\] .* e\.g\. -ps 48 32 40\."):
        prepare_finetune(84, str(checkpoint), patch_size=[50, 30, 40], preprocess=False)
    assert not (nnunet_dirs["nnUNet_preprocessed"] / "Dataset084_PatchDown").exists()
    with pytest.raises(UserError, match="-ps/--patch_size goes with --architecture pretrained"):
        prepare_finetune(84, str(checkpoint), patch_size=[48, 32, 40], preprocess=False, architecture="dynamic")
    assert not (nnunet_dirs["nnUNet_preprocessed"] / "Dataset084_PatchDown").exists()
