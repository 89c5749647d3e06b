"""S3DPretrainTrainer through the stock nnUNetv2_train on the tiny preset (CPU): checkpoints, resume, figures."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import console_script, run_command, write_labeled_dataset

SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


@pytest.fixture
def tiny_dataset(nnunet_dirs):
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 31, "Pre", shapes=[(40, 44, 38), (36, 40, 42)],
                                   spacings=[(1.2, 1.0, 1.0), (1.0, 1.1, 0.9)])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 31, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    return folder


def output_folder(nnunet_dirs, dataset_folder, trainer: str):
    return (nnunet_dirs["nnUNet_results"] / dataset_folder.name / f"{trainer}__nnsslPlansTiny__3d_fullres"
            / "fold_all")


def fresh_tiny_network():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl.plans.presets import RESENC_TINY

    arch = RESENC_TINY.architecture()
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 1, deep_supervision=False)


def test_s3d_pretraining_writes_transferable_checkpoint_and_resumes(nnunet_dirs, tiny_dataset):
    train = ["nnUNetv2_train", 31, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p", "nnsslPlansTiny",
             "-device", "cpu"]
    run_command(train, extra_env=SMOKE)
    out = output_folder(nnunet_dirs, tiny_dataset, "S3DPretrainTrainer")
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "reconstruction_epoch_0000.png",
                 "reconstruction_epoch_0001.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint_latest.pth").exists()
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "S3DPretrainTrainer" and checkpoint["current_epoch"] == 2

    fresh = fresh_tiny_network()
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
    assert any("Revisiting MAE" in c for c in checkpoint["citations"])
    # nnU-Net's development-branch nnssl integration reads checkpoints with weights_only=True
    safe = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert safe["nnssl_adaptation_plan"] == plan

    # resume a finished run for one more epoch (stock --c)
    run_command(train + ["--c"], extra_env={**SMOKE, "nnssl_num_epochs": "3"})
    resumed = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 3
    assert len(resumed["logging"]["train_losses"]) == 3
    assert resumed["nnssl_trainer_state"]["mask_sampler"] != checkpoint["nnssl_trainer_state"]["mask_sampler"]


def test_s3d_pretraining_resumes_after_a_kill_mid_epoch(nnunet_dirs, tiny_dataset):
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnssl_num_epochs": "3",
           "nnssl_iterations_per_epoch": "15", "nnssl_val_iterations_per_epoch": "1"}
    command = [console_script("nnUNetv2_train"), "31", "3d_fullres", "all", "-tr", "S3DPretrainTrainer_ratio75",
               "-p", "nnsslPlansTiny", "-device", "cpu"]
    out = output_folder(nnunet_dirs, tiny_dataset, "S3DPretrainTrainer_ratio75")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint_latest.pth").exists():
            assert process.poll() is None, "training ended before the first checkpoint"
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # well into epoch 1
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert not (out / "checkpoint_final.pth").exists()
    latest = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1

    run_command(["nnUNetv2_train", 31, "3d_fullres", "all", "-tr", "S3DPretrainTrainer_ratio75", "-p",
                 "nnsslPlansTiny", "-device", "cpu", "--c"],
                extra_env={"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "2",
                           "nnssl_val_iterations_per_epoch": "1"})
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    log = "".join(p.read_text() for p in sorted(out.glob("training_log_*.txt")))
    assert "Epoch 1" in log and "Epoch 2" in log


def test_dense_mae_baseline_trains(nnunet_dirs, tiny_dataset):
    run_command(["nnUNetv2_train", 31, "3d_fullres", "all", "-tr", "MAEPretrainTrainer", "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env={**SMOKE, "nnssl_num_epochs": "1"})
    out = output_folder(nnunet_dirs, tiny_dataset, "MAEPretrainTrainer")
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert list(checkpoint["network_weights"]) == list(fresh_tiny_network().state_dict())
    assert not any(k.startswith("mask_tokens") for k in checkpoint["nnssl_pretraining_weights"])
