"""One (pretraining method, backbone) pair through every entry point a user takes, on the tiny presets (CPU).

``check_pretraining_pair`` runs, for one pretraining trainer on the shared tiny dataset:
1. ``nnUNetv2_train`` (one process, the smoke-run variables);
2. ``nnssl_train`` under torchrun with 2 gloo ranks, 2 epochs: both ranks end with identical weights;
3. ``nnssl_prepare_finetune`` of a small labeled dataset from the 2-rank checkpoint;
4. one epoch of ``nnsslFinetuneTrainer`` that loads the pretrained stem and encoder (its log says how many tensors).
It returns the 2-rank run's final checkpoint for the method's own assertions.
"""

import json
import re
import subprocess
from pathlib import Path
from typing import Dict

import torch

from conftest import (NNUNET_VARIABLES, SMOKE_PRETRAINING, TINY_DATASET, TINY_DATASET_ID, run_command,
                      write_labeled_dataset)
from test_torchrun import checksums, nnssl_train

FAMILY_PLANS = {"resenc": "nnsslPlansTiny", "primus": "nnsslPlansPrimusTiny"}
TWO_RANK_SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "1", "nnssl_val_iterations_per_epoch": "1"}
FINETUNE_SMOKE = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1",
                  "nnssl_val_disable_tta": "1", "nnssl_seed": "0"}
DOWN_ID, DOWN = 81, "Dataset081_PairDown"
LOADED_ENCODER = re.compile(r"loaded (\d+) tensors into the encoder")


def check_pretraining_pair(dirs: Dict[str, Path], trainer: str, family: str, tmp_path: Path) -> dict:
    plans = FAMILY_PLANS[family]
    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", plans, "-device", "cpu"],
                extra_env={**SMOKE_PRETRAINING, "nnssl_seed": "0"})
    single = torch.load(dirs["nnUNet_results"] / TINY_DATASET / f"{trainer}__{plans}__3d_fullres" / "fold_all" /
                        "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert torch.isfinite(torch.tensor(single["logging"]["train_losses"])).all()

    env = {variable: str(folder) for variable, folder in dirs.items()}
    env["nnUNet_results"] = str(tmp_path / "two_rank_results")
    result = nnssl_train(TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", plans,
                         env={**env, **TWO_RANK_SMOKE})
    sums = checksums(result.stdout, 2)
    assert sums[0] == sums[1], sums
    pretrained = Path(env["nnUNet_results"]) / TINY_DATASET / f"{trainer}__{plans}__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=False)

    down = {variable: tmp_path / f"down_{variable}" for variable in NNUNET_VARIABLES}
    for folder in down.values():
        folder.mkdir()
    down_env = {variable: str(folder) for variable, folder in down.items()}
    write_labeled_dataset(down["nnUNet_raw"], DOWN_ID, "PairDown", shapes=[(36, 40, 38)] * 5,
                          spacings=[(1.0, 1.0, 1.0)] * 5)
    run_command(["nnssl_prepare_finetune", "-d", DOWN_ID, "-c", pretrained, "-np", 1, "-npfp", 1], extra_env=down_env)
    run_command(["nnUNetv2_train", DOWN_ID, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer", "-p",
                 "nnsslFinetunePlans", "-device", "cpu"], extra_env={**down_env, **FINETUNE_SMOKE})
    model = down["nnUNet_results"] / DOWN / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres" / "fold_0"
    log = "".join(p.read_text() for p in sorted(model.glob("training_log_*.txt")))
    loaded = LOADED_ENCODER.search(log)
    assert loaded and int(loaded.group(1)) > 0, log[-3000:]
    assert (model / "checkpoint_final.pth").is_file()
    return checkpoint


def train_with_a_batch_of_one(dirs: Dict[str, Path], trainer: str) -> subprocess.CompletedProcess:
    """``nnUNetv2_train`` of ``trainer`` on a copy of the tiny plans with batch_size 1 (plans
    ``nnsslPlansTinyBatch1``), not checked: for the refusal of a global batch without negatives."""
    folder = dirs["nnUNet_preprocessed"] / TINY_DATASET
    plans = json.loads((folder / "nnsslPlansTiny.json").read_text())
    plans["plans_name"] = "nnsslPlansTinyBatch1"
    plans["configurations"]["3d_fullres"]["batch_size"] = 1
    (folder / "nnsslPlansTinyBatch1.json").write_text(json.dumps(plans))
    return run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p",
                        "nnsslPlansTinyBatch1", "-device", "cpu"], extra_env=SMOKE_PRETRAINING, check=False)


def build_trainer(dirs: Dict[str, Path], trainer: type, plans: str):
    """``trainer`` built on the shared tiny dataset's ``plans`` on the CPU, as nnU-Net's run_training builds it."""
    folder = dirs["nnUNet_preprocessed"] / TINY_DATASET
    # nnU-Net's run_training adds "continue_training" to the plans before building the trainer
    plans_dict = {**json.loads((folder / f"{plans}.json").read_text()), "continue_training": False}
    return trainer(plans_dict, "3d_fullres", "all", json.loads((folder / "dataset.json").read_text()),
                   device=torch.device("cpu"))
