"""Primus through the stock commands on the tiny Primus preset (CPU): plan, MAE pretraining with token dropping,
resume, nnssl_prepare_finetune, fine-tuning (pretrained and scratch), nnUNetv2_predict, the refusals, and DDP
(``nnssl_train`` under torchrun, 2 ranks, gloo)."""

import pytest
import json
import shutil

import torch

from conftest import SMOKE_PRETRAINING, TINY_DATASET_ID, run_command, write_labeled_dataset
from test_torchrun import assert_mask_streams_per_rank, checksums, nnssl_train
from nnssl.citations import apa_lines
from nnssl.presets import PRIMUS_TINY

PRE_ID, PRE = 71, "Dataset071_PrimusPre"
DOWN_ID, DOWN = 72, "Dataset072_PrimusDown"
SMOKE_2 = {**SMOKE_PRETRAINING, "nnssl_num_epochs": "2"}
FINETUNE_SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1",
                  "nnssl_val_disable_tta": "1", "nnssl_seed": "0"}


def fresh_tiny_primus():
    from nnssl.architectures import network_from_plans

    arch = PRIMUS_TINY.architecture()
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 1)


def training_log(folder) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("training_log_*.txt")))


def plan_primus_pretraining_dataset(nnunet_dirs) -> None:
    write_labeled_dataset(nnunet_dirs["nnUNet_raw"], PRE_ID, "PrimusPre", shapes=[(40, 44, 38), (36, 40, 42)],
                          spacings=[(1.2, 1.0, 1.0), (1.0, 1.1, 0.9)])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", PRE_ID, "-pl", "nnsslPlannerPrimusTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])


@pytest.mark.slow
def test_primus_pretrain_resume_prepare_finetune_predict(nnunet_dirs, tmp_path):
    plan_primus_pretraining_dataset(nnunet_dirs)
    plans = json.loads((nnunet_dirs["nnUNet_preprocessed"] / PRE / "nnsslPlansPrimusTiny.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"] == PRIMUS_TINY.architecture() and config["patch_size"] == [64, 64, 64]
    assert config["spacing"] == [1.0, 1.0, 1.0] and config["normalization_schemes"] == ["ZScoreNormalization"]

    # pretraining through the stock command (the smoke variables win over the _5epochs variant)
    train = ["nnUNetv2_train", PRE_ID, "3d_fullres", "all", "-tr", "PrimusMAEPretrainTrainer_5epochs", "-p",
             "nnsslPlansPrimusTiny", "-device", "cpu"]
    run_command(train, extra_env=SMOKE_2)
    out = nnunet_dirs["nnUNet_results"] / PRE / "PrimusMAEPretrainTrainer_5epochs__nnsslPlansPrimusTiny__3d_fullres" \
        / "fold_all"
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "reconstruction_epoch_0000.png",
                 "reconstruction_epoch_0001.png"):
        assert (out / name).is_file(), name
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    fresh = fresh_tiny_primus()
    assert list(checkpoint["network_weights"]) == list(fresh.state_dict())  # a plain dna Primus
    fresh.load_state_dict(checkpoint["network_weights"], strict=True)
    assert any(k.startswith("decoder.") for k in checkpoint["nnssl_pretraining_weights"])
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["architecture_plans"]["arch_class_name"] == "Primus"
    assert plan["architecture_plans"]["arch_kwargs"] == PRIMUS_TINY.architecture()["arch_kwargs"]
    assert (plan["key_to_encoder"], plan["key_to_stem"], plan["key_to_lpe"]) == ("eva", "down_projection",
                                                                                 "eva.pos_embed")
    assert any("Primus: Enforcing Attention" in line for line in apa_lines(checkpoint["citations"]))
    log = training_log(out)
    assert "Optimizer adamw (weight decay 0.05, gradient clipping at 1.0): linear warm-up 1 epochs to 0.0003" in log
    assert "Masking: MaskingConfig(block_size=8, ratio_range=(0.75, 0.75))" in log

    # the one-epoch variants: too short for the recipe's warm-up epoch and a decay, so the warm-up shrinks away
    for variant in ("PrimusMAEPretrainTrainer_1epoch", "PrimusMAEPretrainTrainer_dynamic_1epoch"):
        run_command(["nnUNetv2_train", PRE_ID, "3d_fullres", "all", "-tr", variant, "-p", "nnsslPlansPrimusTiny",
                     "-device", "cpu"], extra_env={"nnssl_iterations_per_epoch": "1", "nnssl_val_iterations_per_epoch":
                                                   "1", "nnssl_seed": "0"})
        variant_log = training_log(out.parent.parent / f"{variant}__nnsslPlansPrimusTiny__3d_fullres" / "fold_all")
        assert ("linear warm-up 0 epochs to 0.0003, then poly decay to epoch 1 (shrunk to fit a 1-epoch run: the "
                "recipe's warm-up lengths in epochs, 1, leave no epoch to decay in; now 0)") in variant_log
        assert "Training done." in variant_log

    run_command(train + ["--c"], extra_env={**SMOKE_2, "nnssl_num_epochs": "3"})
    resumed = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 3 and len(resumed["logging"]["train_losses"]) == 3
    assert resumed["nnssl_trainer_state"]["mask_sampler"] != checkpoint["nnssl_trainer_state"]["mask_sampler"]
    assert not torch.equal(resumed["network_weights"]["eva.pos_embed"], checkpoint["network_weights"]["eva.pos_embed"])

    # downstream: prepare, fine-tune (nnU-Net's Primus schedule), same-plans scratch baseline, predict
    pretrained = tmp_path / "primus_mae.pth"
    shutil.copy(out / "checkpoint_final.pth", pretrained)
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], DOWN_ID, "PrimusDown", shapes=[(36, 40, 38)] * 5,
                                   spacings=[(1.0, 1.0, 1.0)] * 5)
    run_command(["nnssl_prepare_finetune", "-d", DOWN_ID, "-c", pretrained, "-np", 1, "-npfp", 1])
    down_plans = json.loads((nnunet_dirs["nnUNet_preprocessed"] / DOWN / "nnsslFinetunePlans.json").read_text())
    assert down_plans["configurations"]["3d_fullres"]["architecture"] == PRIMUS_TINY.architecture()
    assert down_plans["nnssl_pretrained"]["key_to_encoder"] == "eva"

    results = nnunet_dirs["nnUNet_results"] / DOWN
    for trainer, expected in (
            ("nnsslFinetuneTrainer", "pretrained stem + encoder; whole-network warm-up 1 iterations, then poly decay "
                                     "to iteration 4; peak LR 0.0001, adamw, deep supervision off"),
            ("nnsslFinetuneTrainer_scratch", "random initialisation; whole-network warm-up 1 iterations, then poly "
                                             "decay to iteration 4; peak LR 0.0003, adamw, deep supervision off")):
        run_command(["nnUNetv2_train", DOWN_ID, "3d_fullres", 0, "-tr", trainer, "-p", "nnsslFinetunePlans",
                     "-device", "cpu"], extra_env=FINETUNE_SMOKE)
        model = results / f"{trainer}__nnsslFinetunePlans__3d_fullres" / "fold_0"
        log = training_log(model)
        assert expected in log, log[-3000:]
        assert (model / "validation" / "summary.json").is_file()
    log = training_log(results / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres" / "fold_0")
    assert "loaded 2 tensors into the stem" in log and f"loaded {len(fresh.eva.state_dict())} tensors into the " \
                                                      f"encoder" in log

    images = tmp_path / "predict_in"
    images.mkdir()
    shutil.copy(folder / "imagesTr" / "case000_0000.nii.gz", images)
    predictions = tmp_path / "predict_out"
    run_command(["nnUNetv2_predict", "-i", images, "-o", predictions, "-d", DOWN_ID, "-c", "3d_fullres", "-f", 0,
                 "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans", "-chk", "checkpoint_final.pth",
                 "-device", "cpu", "--disable_tta"])
    import SimpleITK as sitk

    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "case000.nii.gz")))
    assert segmentation.shape == (36, 40, 38) and set(segmentation.ravel().tolist()) <= {0, 1}

    # a U-Net recipe is refused on Primus plans, and a U-Net plan refuses the Primus checkpoint
    result = run_command(["nnUNetv2_train", DOWN_ID, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer_paper", "-p",
                          "nnsslFinetunePlans", "-device", "cpu"], extra_env=FINETUNE_SMOKE, check=False)
    assert result.returncode != 0
    assert "nnsslFinetuneTrainer_paper is a U-Net recipe and the plans nnsslFinetunePlans build a Primus" in \
        result.stderr
    run_command(["nnUNetv2_plan_and_preprocess", "-d", DOWN_ID, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    result = run_command(["nnUNetv2_train", DOWN_ID, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer", "-p",
                          "nnsslPlansTiny", "-device", "cpu"],
                         extra_env={**FINETUNE_SMOKE, "nnssl_pretrained_checkpoint": str(pretrained)}, check=False)
    assert result.returncode != 0
    assert (f"{pretrained} is a Primus (transformer) checkpoint (Primus), but the plans nnsslPlansTiny build "
            f"ResidualEncoderUNet") in result.stderr


def test_primus_trainer_refuses_resenc_plans(tiny_pretraining_dataset):
    result = run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "PrimusMAEPretrainTrainer",
                          "-p", "nnsslPlansTiny", "-device", "cpu"], extra_env=SMOKE_PRETRAINING, check=False)
    assert result.returncode != 0
    assert ("PrimusMAEPretrainTrainer pretrains a Primus, but the plans nnsslPlansTiny build "
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet") in result.stderr


@pytest.mark.slow
def test_primus_mae_under_ddp_keeps_the_ranks_in_sync(nnunet_dirs):
    """2 ranks (batch 1 each): identical weights on both ranks after training (every parameter gets a gradient,
    as nnU-Net's DDP wrapper with find_unused_parameters=False requires), one mask ratio stream, own patterns."""
    plan_primus_pretraining_dataset(nnunet_dirs)
    env = {variable: str(folder) for variable, folder in nnunet_dirs.items()}
    result = nnssl_train(PRE_ID, "3d_fullres", "all", "-tr", "PrimusMAEPretrainTrainer", "-p", "nnsslPlansPrimusTiny",
                         env={**env, **SMOKE_2})
    sums = checksums(result.stdout, 2)
    assert sums[0] == sums[1] and {"network", "decoder", "mask_token"} <= set(sums[0])
    out = nnunet_dirs["nnUNet_results"] / PRE / "PrimusMAEPretrainTrainer__nnsslPlansPrimusTiny__3d_fullres" / \
        "fold_all"
    assert_mask_streams_per_rank(torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False))
