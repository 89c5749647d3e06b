"""The whole path through the user's commands: demo data -> S3D pretraining -> nnssl_prepare_finetune ->
nnsslFinetuneTrainer -> nnUNetv2_predict -> Dice against the labels (tiny preset, CPU)."""

import numpy as np
import SimpleITK as sitk

from conftest import run_command

PRETRAIN = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}
FINETUNE = {"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    intersection = np.logical_and(prediction == 1, label == 1).sum()
    return float(2 * intersection / max(1, (prediction == 1).sum() + (label == 1).sum()))


def test_pretrain_prepare_finetune_predict_dice(nnunet_dirs, tmp_path):
    source = tmp_path / "source"
    run_command(["nnssl_demo_data", "-o", source, "--num_unlabeled", 4, "--num_labeled", 6, "-d", 502])
    run_command(["nnssl_ingest", "-i", source / "unlabeled", "-d", 501, "-n", "DemoUnlabeled", "-np", 1])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 501, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    run_command(["nnUNetv2_train", 501, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env=PRETRAIN)
    checkpoint = (nnunet_dirs["nnUNet_results"] / "Dataset501_DemoUnlabeled"
                  / "S3DPretrainTrainer__nnsslPlansTiny__3d_fullres" / "fold_all" / "checkpoint_final.pth")

    run_command(["nnssl_prepare_finetune", "-d", 502, "-c", checkpoint, "-np", 1, "-npfp", 1])
    run_command(["nnUNetv2_train", 502, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans",
                 "-device", "cpu"], extra_env=FINETUNE)
    raw = nnunet_dirs["nnUNet_raw"] / "Dataset502_nnsslDemoLabeled"
    model = (nnunet_dirs["nnUNet_results"] / raw.name / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres"
             / "fold_0")
    log = next(model.glob("training_log_*.txt")).read_text()
    assert "loaded 4 tensors into the stem" in log and "tensors into the encoder" in log
    assert "skipped" in log and "Revisiting MAE" in log and "Encoder unfrozen" in log

    predictions = tmp_path / "predictions"
    images = tmp_path / "images"
    images.mkdir()
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))[:2]
    for case in cases:
        (images / f"{case}_0000.nii.gz").write_bytes((raw / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    run_command(["nnUNetv2_predict", "-i", images, "-o", predictions, "-d", 502, "-c", "3d_fullres", "-f", 0,
                 "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans", "-device", "cpu",
                 "--disable_tta", "-npp", 1, "-nps", 1])
    scores = []
    for case in cases:
        predicted = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
        assert predicted.GetSize() == label.GetSize() and predicted.GetSpacing() == label.GetSpacing()
        assert np.allclose(predicted.GetDirection(), label.GetDirection())
        prediction = sitk.GetArrayFromImage(predicted)
        assert set(np.unique(prediction)) <= {0, 1}
        scores.append(dice(prediction, sitk.GetArrayFromImage(label)))
    # six iterations cannot learn the task; the learning effect is measured by benchmarks/transfer_probe.py
    print("Dice per case after the smoke-length fine-tuning:", np.round(scores, 3))
    assert all(0.0 <= s <= 1.0 for s in scores)
