"""The README quickstart through the user's entry points: demo data -> ingest -> stock plan/preprocess -> S3D."""

import json
import pickle

import blosc2
import numpy as np
import SimpleITK as sitk
import torch

from conftest import run_command


def test_demo_data_to_one_millimetre_b2nd_and_anatomy_restricted_pretraining(nnunet_dirs, tmp_path):
    source = tmp_path / "source"
    run_command(["nnssl_demo_data", "-o", source, "--num_unlabeled", 5, "--num_labeled", 0])
    run_command(["nnssl_ingest", "-i", source / "unlabeled", "--anatomy_masks", source / "unlabeled_masks" / "anatomy",
                 "-d", 501, "-n", "DemoUnlabeled", "-np", 1])
    raw = nnunet_dirs["nnUNet_raw"] / "Dataset501_DemoUnlabeled"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 5 and dataset_json["nnssl"]["anatomy_masks"] is True

    run_command(["nnUNetv2_plan_and_preprocess", "-d", 501, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    data_dir = nnunet_dirs["nnUNet_preprocessed"] / raw.name / "nnsslPlansTiny_3d_fullres"
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

    run_command(["nnUNetv2_train", 501, "3d_fullres", "all", "-tr", "S3DPretrainTrainer_anatomy", "-p",
                 "nnsslPlansTiny", "-device", "cpu"],
                extra_env={"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2",
                           "nnssl_val_iterations_per_epoch": "1"})
    out = (nnunet_dirs["nnUNet_results"] / raw.name / "S3DPretrainTrainer_anatomy__nnsslPlansTiny__3d_fullres"
           / "fold_all")
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert np.isfinite(checkpoint["logging"]["train_losses"][0])
    assert (out / "reconstruction_epoch_0000.png").is_file()
