"""Bad input met by the trainers under stock ``nnUNetv2_train`` and ``nnssl_train``: one line naming the variable, file
or fold and the way out, no traceback (unless ``nnssl_debug=1``), no user file changed (issue 19)."""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bad_input_helpers import COMMAND_TIMEOUT, assert_one_line_error, unwritable
from conftest import SMOKE_PRETRAINING, TINY_DATASET, TINY_DATASET_ID, console_script, run_command
from nnssl.errors import UserError
from nnssl.integration.environment import flag_from_environment, int_from_environment
from nnssl.integration.user_errors import user_message
from test_ingest import file_hashes

TRAIN = ["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p", "nnsslPlansTiny",
         "-device", "cpu"]


def results_of(tmp_path: Path) -> dict:
    """A results folder of the test's own: the preprocessed tiny dataset is shared, its results must not be."""
    return {"nnUNet_results": str(tmp_path / "results")}


def output_folder(tmp_path: Path, trainer: str) -> Path:
    return tmp_path / "results" / TINY_DATASET / f"{trainer}__nnsslPlansTiny__3d_fullres" / "fold_all"


@pytest.mark.parametrize("variable, value, message", [
    ("nnssl_val_iterations_per_epoch", "", "nnssl_val_iterations_per_epoch is set but empty"),
    ("nnssl_num_epochs", " ", "nnssl_num_epochs is set but empty"),
    ("nnssl_num_epochs", "-1", "nnssl_num_epochs='-1' must be at least 1"),
    ("nnssl_num_epochs", "2.5", "nnssl_num_epochs='2.5' is not a whole number"),
    ("nnssl_seed", "-3", "nnssl_seed='-3' must be at least 0"),
    ("nnssl_torch_threads", "abc", "nnssl_torch_threads='abc' is not a whole number"),
])
def test_invalid_and_empty_variables_are_errors_naming_them(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(UserError, match=message):
        int_from_environment(variable, None, minimum=0 if variable == "nnssl_seed" else 1)


@pytest.mark.parametrize("value", ["", "maybe"])
def test_invalid_and_empty_flags_are_errors(monkeypatch, value):
    monkeypatch.setenv("nnssl_val_disable_tta", value)
    with pytest.raises(UserError, match="nnssl_val_disable_tta"):
        flag_from_environment("nnssl_val_disable_tta")


def test_an_empty_variable_stops_nnunetv2_train_with_one_line(tiny_pretraining_dataset, tmp_path):
    result = run_command(TRAIN, extra_env={**SMOKE_PRETRAINING, **results_of(tmp_path),
                                           "nnssl_val_iterations_per_epoch": ""}, check=False, timeout=COMMAND_TIMEOUT)

    assert_one_line_error(result, "nnssl: error: Environment variable nnssl_val_iterations_per_epoch is set but empty")
    assert not list((tmp_path / "results").rglob("checkpoint_*.pth"))


def test_an_invalid_variable_stops_nnssl_train_with_one_line(tiny_pretraining_dataset, tmp_path):
    result = run_command(["nnssl_train", *TRAIN[1:]], extra_env={**SMOKE_PRETRAINING, **results_of(tmp_path),
                                                                 "nnssl_num_epochs": "2.5"},
                         check=False, timeout=COMMAND_TIMEOUT)

    assert result.returncode == 1
    assert_one_line_error(result, "nnssl_train: error: Environment variable nnssl_num_epochs='2.5' is not a whole "
                                  "number")


def test_nnssl_debug_shows_the_traceback_of_a_user_error(nnunet_dirs, tmp_path):
    (tmp_path / "in").mkdir()
    command = ["nnssl_ingest", "-i", tmp_path / "in", "-d", 509, "-n", "Debug"]

    plain = run_command(command, check=False, timeout=COMMAND_TIMEOUT)
    debug = run_command(command, extra_env={"nnssl_debug": "1"}, check=False, timeout=COMMAND_TIMEOUT)

    assert_one_line_error(plain, "nnssl_ingest: error: No images (")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "IngestError: No images (" in debug.stderr


@pytest.mark.parametrize("trainer", ["S3DPretrainTrainer", "nnsslTrainer"])
def test_a_truncated_checkpoint_names_the_file_and_the_way_out(tiny_pretraining_dataset, tmp_path, trainer):
    folder = output_folder(tmp_path, trainer)
    folder.mkdir(parents=True)
    torch.save({"network_weights": {"w": torch.zeros(1000)}, "current_epoch": 3}, folder / "checkpoint_latest.pth")
    latest = folder / "checkpoint_latest.pth"
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    (folder / "checkpoint_best.pth").write_bytes(b"an earlier checkpoint")
    before = file_hashes(folder)

    result = run_command([TRAIN[0], *TRAIN[1:5], trainer, *TRAIN[6:], "--c"],
                         extra_env={**SMOKE_PRETRAINING, **results_of(tmp_path)}, check=False, timeout=COMMAND_TIMEOUT)

    assert_one_line_error(result, f"nnssl: error: {latest} is truncated or corrupt (torch.load: ",
                          f"Move it away (mv {latest} {latest}.bad) and rerun with --c to resume from "
                          "checkpoint_best.pth, or rerun without --c to start over.")
    assert {k: v for k, v in file_hashes(folder).items() if Path(k).name.startswith("checkpoint_")} == before


def test_too_few_cases_for_a_fold_is_one_line_and_writes_no_split(tiny_pretraining_dataset, tmp_path):
    splits = tiny_pretraining_dataset["nnUNet_preprocessed"] / TINY_DATASET / "splits_final.json"

    result = run_command([*TRAIN[:3], "0", *TRAIN[4:]], extra_env={**SMOKE_PRETRAINING, **results_of(tmp_path)},
                         check=False, timeout=COMMAND_TIMEOUT)

    assert_one_line_error(result, f"nnssl: error: {TINY_DATASET} has 2 case(s), too few for fold 0: nnU-Net's 5-fold "
                                  "cross-validation needs at least 5. Train fold 'all'")
    assert not splits.exists()


def test_an_unwritable_results_folder_stops_the_trainer_constructor_with_one_line(tiny_pretraining_dataset, tmp_path):
    results = tmp_path / "results"
    results.mkdir()

    with unwritable(results):
        result = run_command(TRAIN, extra_env={**SMOKE_PRETRAINING, "nnUNet_results": str(results)}, check=False,
                             timeout=COMMAND_TIMEOUT)

    assert_one_line_error(result, f"nnssl: error: {results / TINY_DATASET}", "make it writable for this user")
    assert not os.listdir(results)


def test_ctrl_c_during_training_says_which_checkpoint_was_kept(tiny_pretraining_dataset, tmp_path):
    folder = output_folder(tmp_path, "S3DPretrainTrainer")
    env = {**os.environ, **results_of(tmp_path), "nnUNet_def_n_proc": "1", "nnssl_num_epochs": "1000",
           "nnssl_iterations_per_epoch": "1", "nnssl_val_iterations_per_epoch": "1"}  # nnU-Net's workers, as users
    process = subprocess.Popen([console_script(TRAIN[0]), *map(str, TRAIN[1:])], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not (folder / "checkpoint_best.pth").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)

    os.killpg(process.pid, signal.SIGINT)
    result = subprocess.CompletedProcess(process.args, process.wait(COMMAND_TIMEOUT), *process.communicate())

    assert result.returncode == -signal.SIGINT  # what a shell reports as exit status 130
    assert_one_line_error(result, f"nnssl: interrupted (Ctrl-C). {folder} keeps ", "checkpoint_best.pth; rerun the "
                                  "same command with --c to resume from ")


def test_operating_system_errors_about_folders_are_user_errors_and_others_are_bugs():
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/nnUNet_results/Dataset001")
    assert user_message(denied) == ("/data/nnUNet_results/Dataset001: Permission denied; make it writable for this "
                                    "user, or point the command at a folder you can write, then rerun.")
    assert "free disk space" in user_message(OSError(errno.ENOSPC, "No space left on device", "/data/x"))
    assert user_message(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    assert user_message(KeyError("bug")) is None
