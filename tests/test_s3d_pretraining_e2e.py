"""S3DPretrainTrainer through the stock nnUNetv2_train on the tiny preset (CPU): checkpoints, resume, figures."""

import pytest
import os
import signal
import subprocess
import time

import torch

from conftest import (TINY_DATASET_ID, console_script, pretrain_smoke, pretraining_output, run_command,
                      tiny_network)
from nnssl.citations import apa_lines

SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def test_s3d_pretraining_writes_transferable_checkpoint_and_resumes(tiny_pretraining_dataset):
    train = ["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "S3DPretrainTrainer_5epochs", "-p",
             "nnsslPlansTiny", "-device", "cpu"]
    run_command(train, extra_env=SMOKE)  # the smoke variables win over the _5epochs variant
    out = pretraining_output(tiny_pretraining_dataset, "S3DPretrainTrainer_5epochs")
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "reconstruction_epoch_0000.png",
                 "reconstruction_epoch_0001.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint_latest.pth").exists()
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "S3DPretrainTrainer_5epochs" and checkpoint["current_epoch"] == 2

    fresh = tiny_network()
    assert list(checkpoint["network_weights"]) == list(fresh.state_dict())
    fresh.load_state_dict(checkpoint["network_weights"], strict=True)
    trained_stem = checkpoint["network_weights"]["encoder.stem.convs.0.all_modules.0.weight"]
    assert torch.equal(checkpoint["network_weights"]["encoder.stem.convs.0.conv.weight"], trained_stem)
    assert any(k.startswith("mask_tokens") for k in checkpoint["nnssl_pretraining_weights"])

    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["pretrain_num_input_channels"] == 1
    assert plan["recommended_downstream_patchsize"] == [64, 64, 64]
    assert plan["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    assert list(plan["pretrain_plan"]["configurations"]) == ["3d_fullres"]
    assert any("Revisiting MAE" in line for line in apa_lines(checkpoint["citations"]))
    # nnU-Net's development-branch nnssl integration reads checkpoints with weights_only=True
    safe = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert safe["nnssl_adaptation_plan"] == plan

    # resume a finished run for one more epoch (stock --c)
    run_command(train + ["--c"], extra_env={**SMOKE, "nnssl_num_epochs": "3"})
    resumed = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 3
    assert len(resumed["logging"]["train_losses"]) == 3
    assert resumed["nnssl_trainer_state"]["mask_sampler"] != checkpoint["nnssl_trainer_state"]["mask_sampler"]


@pytest.mark.slow
def test_s3d_pretraining_resumes_after_a_kill_mid_epoch(tiny_pretraining_dataset):
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnssl_num_epochs": "3",
           "nnssl_iterations_per_epoch": "4", "nnssl_val_iterations_per_epoch": "1"}
    command = [console_script("nnUNetv2_train"), str(TINY_DATASET_ID), "3d_fullres", "all", "-tr",
               "S3DPretrainTrainer_ratio75", "-p", "nnsslPlansTiny", "-device", "cpu"]
    out = pretraining_output(tiny_pretraining_dataset, "S3DPretrainTrainer_ratio75")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint_latest.pth").exists():
            assert process.poll() is None, "training ended before the first checkpoint"
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(0.3)  # into epoch 1
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert not (out / "checkpoint_final.pth").exists()
    latest = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1

    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "S3DPretrainTrainer_ratio75", "-p",
                 "nnsslPlansTiny", "-device", "cpu", "--c"],
                extra_env={"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "2",
                           "nnssl_val_iterations_per_epoch": "1"})
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    log = "".join(p.read_text() for p in sorted(out.glob("training_log_*.txt")))
    assert "Epoch 1" in log and "Epoch 2" in log


def test_dense_mae_baseline_trains(tiny_pretraining_dataset):
    _, checkpoint = pretrain_smoke(tiny_pretraining_dataset, "MAEPretrainTrainer")
    assert list(checkpoint["network_weights"]) == list(tiny_network().state_dict())
    assert not any(k.startswith("mask_tokens") for k in checkpoint["nnssl_pretraining_weights"])


def test_bad_smoke_variable_is_named(tiny_pretraining_dataset):
    result = run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p",
                          "nnsslPlansTiny", "-device", "cpu"], extra_env={"nnssl_num_epochs": "0"}, check=False)
    assert result.returncode != 0
    assert "nnssl_num_epochs='0' must be at least 1" in result.stderr
