"""Short fine-tuning runs learn on a labeled task unlike the demo's: the pretrained arm and nnU-Net's recipe segment.

Behind it: at 5 x 20 iterations the old fine-tuning recipe predicted no foreground voxel where nnU-Net's own recipe
on the same plans reached Dice 0.93. Here the labeled task is one the pretraining data never showed: the brain mask
(the tissue inside the CSF rim, a large structure as in skull stripping) of heads stored oblique and flipped, with 0.9 x 0.9 x 2.5 mm voxels and float intensities with an offset. Each arm trains through
``nnUNetv2_train`` on two cases and must segment the two held-out ones.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_command
from nnssl.demo.data import _rotation, centred_grid, HeadAnatomy, render_head

UNSEEN_ID, UNSEEN_DATASET = 503, "Dataset503_UnseenBrain"
SPACING = (0.9, 0.9, 2.5)  # x, y, z (mm): thick slices
DIRECTIONS = (_rotation(0, 20) @ _rotation(2, 30) @ np.diag([-1.0, 1.0, 1.0]), _rotation(1, -25))
# A learning measurement, not a test of the configuration users run (every method's smoke run and the README
# quickstart test that, at nnU-Net's default threads and workers): 400 training iterations at two torch threads beside
# another test's training oversubscribe a 2-core machine (1108 s measured, against about 180 s with one thread and
# augmentation in the process).
ONE_THREAD = {"nnssl_torch_threads": "1", "nnUNet_n_proc_DA": "0"}
FINETUNE = {"nnssl_num_epochs": "5", "nnssl_iterations_per_epoch": "20", "nnssl_val_iterations_per_epoch": "1",
            "nnssl_seed": "0", "nnssl_val_disable_tta": "1", **ONE_THREAD}
# the pretrained arm and nnU-Net's recipe on the same plans; the _scratch twin shares the pretrained arm's recipe
# and its log line is checked in test_finetune_e2e
ARMS = ("nnsslFinetuneTrainer", "nnsslTrainer")
MIN_DICE = 0.5


def unseen_case(index: int) -> tuple[sitk.Image, sitk.Image]:
    """(image, brain mask) of one head on an oblique, anisotropic grid with float intensities."""
    rng = np.random.default_rng([503, index])
    semi_axes = np.array([rng.uniform(27, 35), rng.uniform(31, 40), rng.uniform(28, 36)])
    size = np.ceil(2 * (semi_axes.max() + 6) / np.asarray(SPACING)).astype(int)
    centre = rng.uniform(-3, 3, 3)
    grid = centred_grid(size, SPACING, DIRECTIONS[index % len(DIRECTIONS)], centre)
    points = grid.world_coordinates() - centre[:, None, None, None]  # mm from the head's centre
    anatomy = HeadAnatomy.draw(semi_axes, rng)
    values, _ = render_head(points, anatomy, rng)
    return (grid.image((values * 900.0 - 150.0).astype(np.float32)),
            grid.image(anatomy.brain(points).astype(np.uint8)))


def write_unseen_dataset(raw: Path, count: int) -> Path:
    folder = raw / UNSEEN_DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for index in range(count):
        image, label = unseen_case(index)
        sitk.WriteImage(image, str(folder / "imagesTr" / f"brain_{index:03d}_0000.nii.gz"), True)
        sitk.WriteImage(label, str(folder / "labelsTr" / f"brain_{index:03d}.nii.gz"), True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": count,
        "file_ending": ".nii.gz"}))
    return folder


def validation_dice(results: Path, trainer: str) -> float:
    summary = results / UNSEEN_DATASET / f"{trainer}__nnsslFinetunePlans__3d_fullres" / "fold_0" / "validation"
    return float(json.loads((summary / "summary.json").read_text())["foreground_mean"]["Dice"])


@pytest.mark.slow
def test_every_arm_segments_an_unseen_task_at_5x20_iterations(nnunet_dirs, tmp_path):
    source = tmp_path / "source"
    run_command(["nnssl_demo_data", "-o", source, "--num_unlabeled", 3, "--num_labeled", 0])
    run_command(["nnssl_ingest", "-i", source / "unlabeled", "-d", 501, "-n", "DemoUnlabeled", "-np", 1])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 501, "-pl", "nnsslPlannerMini", "-c", "3d_fullres", "-np", 1,
                 "-npfp", 1, "--no_pbar"])
    run_command(["nnUNetv2_train", 501, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p", "nnsslPlansMini",
                 "-device", "cpu"], extra_env={"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "5",
                                               "nnssl_val_iterations_per_epoch": "1", "nnssl_seed": "0", **ONE_THREAD})
    checkpoint = (nnunet_dirs["nnUNet_results"] / "Dataset501_DemoUnlabeled"
                  / "S3DPretrainTrainer__nnsslPlansMini__3d_fullres" / "fold_all" / "checkpoint_final.pth")

    write_unseen_dataset(nnunet_dirs["nnUNet_raw"], 4)
    run_command(["nnssl_prepare_finetune", "-d", UNSEEN_ID, "-c", checkpoint, "-np", 1, "-npfp", 1])
    split = [{"train": ["brain_002", "brain_003"], "val": ["brain_000", "brain_001"]}]
    (nnunet_dirs["nnUNet_preprocessed"] / UNSEEN_DATASET / "splits_final.json").write_text(json.dumps(split))

    scores = {}
    for trainer in ARMS:
        run_command(["nnUNetv2_train", UNSEEN_ID, "3d_fullres", 0, "-tr", trainer, "-p", "nnsslFinetunePlans",
                     "-device", "cpu"], extra_env=FINETUNE)
        scores[trainer] = validation_dice(nnunet_dirs["nnUNet_results"], trainer)
    print("held-out Dice after 5 x 20 iterations:", scores)
    assert all(dice > MIN_DICE for dice in scores.values()), scores
