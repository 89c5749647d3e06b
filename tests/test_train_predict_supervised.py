"""Stock nnUNetv2_train / nnUNetv2_predict with nnssl's supervised trainer on the tiny preset (CPU)."""

import json

import numpy as np
import SimpleITK as sitk

from conftest import run_command, write_labeled_dataset

SMOKE = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def test_train_with_smoke_variables_then_predict(nnunet_dirs, tmp_path):
    raw = nnunet_dirs["nnUNet_raw"]
    folder = write_labeled_dataset(raw, 21, "Sup", shapes=[(30, 34, 32)] * 5,
                                   spacings=[(1.0, 1.0, 1.0), (1.2, 1.0, 1.0), (1.0, 0.9, 1.1), (1.0, 1.0, 1.0), (0.9, 1.0, 1.0)])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 21, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    # the _5epochs variant would run 5 epochs; the smoke variable wins
    run_command(["nnUNetv2_train", 21, "3d_fullres", 0, "-tr", "nnsslTrainer_5epochs", "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env=SMOKE)
    model_dir = nnunet_dirs["nnUNet_results"] / folder.name / "nnsslTrainer_5epochs__nnsslPlansTiny__3d_fullres"
    log = next((model_dir / "fold_0").glob("training_log_*.txt")).read_text()
    assert "nnssl schedule overrides from the environment" in log
    assert "Epoch 0" in log and "Epoch 1" not in log
    assert (model_dir / "fold_0" / "checkpoint_final.pth").is_file()

    images_in = tmp_path / "predict_in"
    images_in.mkdir()
    source = folder / "imagesTr" / "case000_0000.nii.gz"
    (images_in / source.name).write_bytes(source.read_bytes())
    out = tmp_path / "predict_out"
    run_command(["nnUNetv2_predict", "-i", images_in, "-o", out, "-d", 21, "-c", "3d_fullres", "-f", 0,
                 "-tr", "nnsslTrainer_5epochs", "-p", "nnsslPlansTiny", "-device", "cpu", "--disable_tta",
                 "-npp", 1, "-nps", 1])
    prediction = sitk.ReadImage(str(out / "case000.nii.gz"))
    assert prediction.GetSize() == sitk.ReadImage(str(source)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}


def test_bad_smoke_variable_is_named(nnunet_dirs):
    write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 22, "Bad", shapes=[(20, 20, 20)] * 2,
                          spacings=[(1.0, 1.0, 1.0)] * 2)
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 22, "-pl", "nnsslPlannerTiny", "-npfp", 1, "--no_pp"])
    result = run_command(["nnUNetv2_train", 22, "3d_fullres", "all", "-tr", "nnsslTrainer", "-p", "nnsslPlansTiny",
                          "-device", "cpu"], extra_env={"nnssl_num_epochs": "0"}, check=False)
    assert result.returncode != 0
    assert "nnssl_num_epochs='0' must be at least 1" in result.stderr
