"""nnssl_seed: the same seed gives the same loss curve (weights, sampling, augmentation workers), another seed not."""

import pytest
import torch

from conftest import TINY_DATASET, TINY_DATASET_ID, run_command
from nnssl.integration.seeding import MASK_STREAM, stream_seed

SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "3", "nnssl_val_iterations_per_epoch": "2",
         "nnssl_val_disable_tta": "1"}


def loss_curve(dirs, tmp_path, trainer: str, seed: str, run: str, workers: str) -> tuple:
    results = tmp_path / run
    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env={**SMOKE, "nnssl_seed": seed, "nnUNet_results": str(results),
                                               "nnUNet_n_proc_DA": workers})
    folder = results / TINY_DATASET / f"{trainer}__nnsslPlansTiny__3d_fullres" / "fold_all"
    logging = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert f"nnssl_seed={seed}: Python, numpy, torch and the augmentation workers are seeded" in log
    if trainer == "S3DPretrainTrainer":  # the masks follow the seed too
        assert log.count(f", mask seed {stream_seed(int(seed), 0, MASK_STREAM)}") == 1
    return tuple(logging["train_losses"]), tuple(logging["val_losses"])


@pytest.mark.slow
@pytest.mark.parametrize("trainer, workers", [("nnsslTrainer", "2"), ("S3DPretrainTrainer", "0")])
def test_same_seed_same_loss_curve(tiny_pretraining_dataset, tmp_path, trainer, workers):
    first = loss_curve(tiny_pretraining_dataset, tmp_path, trainer, "7", "a", workers)
    second = loss_curve(tiny_pretraining_dataset, tmp_path, trainer, "7", "b", workers)
    assert first == second
    if trainer == "nnsslTrainer":  # with two augmentation workers, a different seed changes the curve
        assert loss_curve(tiny_pretraining_dataset, tmp_path, trainer, "8", "c", workers) != first


def test_bad_seed_is_a_clear_error(tiny_pretraining_dataset, tmp_path):
    result = run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "nnsslTrainer", "-p",
                          "nnsslPlansTiny", "-device", "cpu"], extra_env={**SMOKE, "nnssl_seed": "abc"}, check=False)
    assert result.returncode != 0 and "nnssl_seed='abc' is not a whole number" in result.stderr
