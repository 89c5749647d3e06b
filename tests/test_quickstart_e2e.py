"""The README quickstart, whole, through the user's entry points (tiny preset, CPU):
demo data -> nnssl_ingest (anatomy masks) -> nnUNetv2_plan_and_preprocess (1 mm .b2nd) -> S3D pretraining ->
nnssl_prepare_finetune -> nnsslFinetuneTrainer -> nnUNetv2_predict -> Dice against the labels."""

import json
import pickle

import blosc2
import numpy as np
import SimpleITK as sitk
import torch

from conftest import run_command

PRETRAIN = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}
FINETUNE = {"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    intersection = np.logical_and(prediction == 1, label == 1).sum()
    return float(2 * intersection / max(1, (prediction == 1).sum() + (label == 1).sum()))


def check_one_millimetre_b2nd(raw, data_dir) -> None:
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    assert sorted(p.stem for p in data_dir.glob("*.b2nd") if not p.stem.endswith("_seg")) == cases
    for case in cases:
        with open(data_dir / f"{case}.pkl", "rb") as f:
            properties = pickle.load(f)
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        spacing_numpy_order = np.array(image.GetSpacing()[::-1])
        assert np.allclose(properties["spacing"], spacing_numpy_order)
        cropped = np.array(properties["shape_after_cropping_and_before_resampling"])
        data = blosc2.open(str(data_dir / f"{case}.b2nd"), mode="r")
        assert tuple(data.shape[1:]) == tuple(np.round(cropped * spacing_numpy_order).astype(int))  # 1 mm voxels
        seg = blosc2.open(str(data_dir / f"{case}_seg.b2nd"), mode="r")[:]
        assert set(np.unique(seg)) <= {-1, 0, 1} and (seg == 1).any()  # anatomy label carried along


def test_readme_quickstart(nnunet_dirs, tmp_path):
    results = nnunet_dirs["nnUNet_results"]
    source = tmp_path / "source"
    run_command(["nnssl_demo_data", "-o", source, "--num_unlabeled", 4, "--num_labeled", 6, "-d", 502])
    run_command(["nnssl_ingest", "-i", source / "unlabeled", "--anatomy_masks", source / "unlabeled_masks" / "anatomy",
                 "-d", 501, "-n", "DemoUnlabeled", "-np", 1])
    raw = nnunet_dirs["nnUNet_raw"] / "Dataset501_DemoUnlabeled"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 4 and dataset_json["nnssl"]["anatomy_masks"] is True

    run_command(["nnUNetv2_plan_and_preprocess", "-d", 501, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    check_one_millimetre_b2nd(raw, nnunet_dirs["nnUNet_preprocessed"] / raw.name / "nnsslPlansTiny_3d_fullres")

    run_command(["nnUNetv2_train", 501, "3d_fullres", "all", "-tr", "S3DPretrainTrainer_anatomy", "-p",
                 "nnsslPlansTiny", "-device", "cpu"], extra_env=PRETRAIN)
    pretrained = results / raw.name / "S3DPretrainTrainer_anatomy__nnsslPlansTiny__3d_fullres" / "fold_all"
    checkpoint = torch.load(pretrained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert np.isfinite(checkpoint["logging"]["train_losses"][0])
    assert (pretrained / "reconstruction_epoch_0000.png").is_file()

    run_command(["nnssl_prepare_finetune", "-d", 502, "-c", pretrained / "checkpoint_final.pth", "-np", 1,
                 "-npfp", 1])
    run_command(["nnUNetv2_train", 502, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans",
                 "-device", "cpu"], extra_env=FINETUNE)
    labeled = nnunet_dirs["nnUNet_raw"] / "Dataset502_nnsslDemoLabeled"
    model = results / labeled.name / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres" / "fold_0"
    log = next(model.glob("training_log_*.txt")).read_text()
    assert "loaded 4 tensors into the stem" in log and "tensors into the encoder" in log
    assert "skipped" in log and "Revisiting MAE" in log and "Encoder unfrozen" in log

    images = tmp_path / "images"
    images.mkdir()
    cases = sorted(p.name[: -len(".nii.gz")] for p in (labeled / "labelsTr").glob("*.nii.gz"))[:2]
    for case in cases:
        (images / f"{case}_0000.nii.gz").write_bytes((labeled / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    predictions = tmp_path / "predictions"
    run_command(["nnUNetv2_predict", "-i", images, "-o", predictions, "-d", 502, "-c", "3d_fullres", "-f", 0,
                 "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans", "-device", "cpu", "--disable_tta",
                 "-npp", 1, "-nps", 1])
    scores = []
    for case in cases:
        predicted = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(labeled / "labelsTr" / f"{case}.nii.gz"))
        assert predicted.GetSize() == label.GetSize() and predicted.GetSpacing() == label.GetSpacing()
        assert np.allclose(predicted.GetDirection(), label.GetDirection())
        prediction = sitk.GetArrayFromImage(predicted)
        assert set(np.unique(prediction)) <= {0, 1}
        scores.append(dice(prediction, sitk.GetArrayFromImage(label)))
    # six smoke iterations cannot learn the task: the learning effect is measured by benchmarks/transfer_probe.py
    print("Dice per case after the smoke-length fine-tuning:", np.round(scores, 3))
