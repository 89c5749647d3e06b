"""Runs that survive a cluster (tiny preset, CPU): preemption signals, automatic resume, a resumed run being the same
run, two checkpoint generations, unreadable cases, torchrun restarts after a rank was killed.

Every training here goes through the user's entry point (``nnUNetv2_train``, or ``nnssl_train`` under ``torchrun``)
at nnU-Net's default threads and workers, seeded where runs are compared, and under the suite's hang guard.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict

import pytest
import torch

from conftest import (TINY_DATASET, TINY_DATASET_ID, StartedCommand, console_script, pretraining_output, run_command)
from test_finetune_e2e import prepared_two_channel_dataset

S3D = "S3DPretrainTrainer"
S3D_RUN = {"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "4", "nnssl_val_iterations_per_epoch": "1",
           "nnssl_seed": "0"}
PREEMPTED = 75  # nnssl.integration.preemption.PREEMPTED_EXIT_CODE, as documented
TRAIN_S3D = ["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny", "-device",
             "cpu"]


def results_env(dataset: Dict[str, Path], results: Path, **extra: str) -> Dict[str, str]:
    """The shared tiny dataset's folders with a results folder of the test's own."""
    env = {variable: str(folder) for variable, folder in dataset.items()}
    return {**env, "nnUNet_results": str(results), **extra}


def final_checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def assert_same_weights(first: dict, second: dict) -> None:
    a, b = first["network_weights"], second["network_weights"]
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-6)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def preempt(command: StartedCommand, when: str, sig: int = signal.SIGUSR1) -> str:
    """Send ``sig`` to the training process once ``when`` is in its output; its output after it has exited."""
    command.wait_for(when)
    os.kill(command.process.pid, sig)
    assert command.finish(timeout=300) == PREEMPTED, command.output[-4000:]
    return command.output


# ------------------------------------------------------------------------------------------------ single process
@pytest.mark.slow
def test_a_preempted_pretraining_resumes_by_itself_into_the_same_run(_shared_tiny_dataset, tmp_path):
    """SIGUSR1 inside an epoch: checkpoint at that iteration, exit 75; the plain rerun of the same command resumes
    and ends with the uninterrupted run's weights and losses. The same run again from a truncated
    ``checkpoint_latest.pth``, requeued by SLURM: the resume falls back to the previous generation, says so, and
    still ends there."""
    uninterrupted = tmp_path / "uninterrupted"
    run_command(TRAIN_S3D, extra_env=results_env(_shared_tiny_dataset, uninterrupted, **S3D_RUN))
    reference = final_checkpoint(pretraining_output({"nnUNet_results": uninterrupted}, S3D))

    results = tmp_path / "preempted"
    env = results_env(_shared_tiny_dataset, results, **S3D_RUN)
    output = preempt(StartedCommand(TRAIN_S3D, tmp_path / "first.log", env), "Epoch 1")
    stop = re.search(r"SIGUSR1: stopping before iteration (\d) of epoch 1; writing checkpoint_latest.pth", output)
    assert stop and "exiting with code 75" in output, output[-3000:]
    folder = pretraining_output({"nnUNet_results": results}, S3D)
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    state = latest["nnssl_run_state"]
    assert state["preempted_by"] == "SIGUSR1" and latest["current_epoch"] == 1
    assert state["position"] == {"epoch": 1, "iteration": int(stop.group(1))}
    assert len(state["ranks"][0]["epoch_outputs"]) == int(stop.group(1))
    assert (folder / "checkpoint_previous.pth").is_file()  # the generation before: end of epoch 0

    corrupt = tmp_path / "corrupt"
    shutil.copytree(results, corrupt)
    rerun = run_command(TRAIN_S3D, extra_env=env)
    assert "this run stopped at a preemption request (SIGUSR1): resuming this run from" in rerun.stdout
    assert f"Resumed at epoch 1, iteration {stop.group(1)}" in rerun.stdout
    resumed = final_checkpoint(folder)
    assert_same_weights(resumed, reference)
    assert resumed["logging"]["train_losses"] == pytest.approx(reference["logging"]["train_losses"], abs=1e-7)
    assert resumed["logging"]["val_losses"] == pytest.approx(reference["logging"]["val_losses"], abs=1e-7)
    assert not (folder / "checkpoint_previous.pth").exists()  # a finished run keeps final and best, as nnU-Net's

    corrupt_folder = pretraining_output({"nnUNet_results": corrupt}, S3D)
    latest_file = corrupt_folder / "checkpoint_latest.pth"
    latest_file.write_bytes(latest_file.read_bytes()[:4096])
    requeued = results_env(_shared_tiny_dataset, corrupt, SLURM_RESTART_COUNT="1", **S3D_RUN)  # as SLURM requeues
    fallback = run_command(TRAIN_S3D, extra_env=requeued)
    previous = corrupt_folder / "checkpoint_previous.pth"
    assert re.search(rf"{re.escape(str(latest_file))} cannot be read \(torch.load: .+\); resuming from the previous "
                     rf"generation {re.escape(str(previous))} \(epoch 1\) instead", fallback.stdout), \
        fallback.stdout[-3000:]
    assert f"SLURM requeue 1 (SLURM_RESTART_COUNT=1): resuming this run from {previous}" in fallback.stdout
    assert_same_weights(final_checkpoint(corrupt_folder), reference)


@pytest.mark.slow
def test_a_preempted_finetuning_resumes_across_the_encoder_unfreeze_into_the_same_run(nnunet_dirs, tmp_path):
    """Fine-tuning stopped while the encoder is still frozen (decoder warm-up) and resumed by a plain rerun crosses
    the unfreeze (encoder optimizer state reset there) and ends with the uninterrupted run's weights."""
    prepared_two_channel_dataset(nnunet_dirs, tmp_path)
    trainer = "nnsslFinetuneTrainer_150ep"  # warm-ups of a third of the run each: the unfreeze is at iteration 4
    train = ["nnUNetv2_train", 41, "3d_fullres", 0, "-tr", trainer, "-p", "nnsslFinetunePlans", "-device", "cpu"]
    env = {"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "4", "nnssl_val_iterations_per_epoch": "1",
           "nnssl_seed": "0", "nnssl_val_disable_tta": "1"}
    folder = nnunet_dirs["nnUNet_results"] / "Dataset041_Down" / f"{trainer}__nnsslFinetunePlans__3d_fullres" / "fold_0"
    uninterrupted = run_command(train, extra_env=env)
    assert "Encoder unfrozen at iteration 4" in uninterrupted.stdout
    reference = final_checkpoint(folder)
    shutil.rmtree(folder)

    output = preempt(StartedCommand(train, tmp_path / "first.log", env), "Epoch 0")
    position = torch.load(folder / "checkpoint_latest.pth", weights_only=False)["nnssl_run_state"]["position"]
    assert position["epoch"] == 0 and "Encoder unfrozen" not in output  # stopped before the unfreeze
    rerun = run_command(train, extra_env=env)
    assert f"Resumed at epoch 0" in rerun.stdout and "Encoder unfrozen at iteration 4" in rerun.stdout
    assert_same_weights(final_checkpoint(folder), reference)


def test_unreadable_cases_are_skipped_up_to_the_limit_and_segmentation_names_the_file(_shared_tiny_dataset,
                                                                                       tmp_path):
    """A truncated preprocessed case: pretraining skips it (one log line, counted in the checkpoint) and stops with an
    error past ``nnssl_max_unreadable_cases``; segmentation training stops at once, naming the file."""
    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(_shared_tiny_dataset["nnUNet_preprocessed"], preprocessed)
    case_file = preprocessed / TINY_DATASET / "nnsslPlansTiny_3d_fullres" / "case001.b2nd"
    case_file.write_bytes(case_file.read_bytes()[:3000])
    dataset = {**_shared_tiny_dataset, "nnUNet_preprocessed": preprocessed}
    smoke = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "3", "nnssl_val_iterations_per_epoch": "1",
             "nnssl_seed": "0", "nnssl_auto_resume": "1"}

    skipped = run_command(TRAIN_S3D, extra_env=results_env(dataset, tmp_path / "skip", **smoke))
    assert "nnssl_auto_resume=1: no checkpoint of this run in" in skipped.stdout  # a fresh start stays fresh
    assert re.search(rf"Skipped unreadable case case001: {re.escape(str(case_file))} .*\(1 unreadable so far, limit "
                     rf"10\)", skipped.stdout), skipped.stdout[-3000:]
    assert "1 unreadable case(s) skipped in this run: case001" in skipped.stdout
    state = final_checkpoint(pretraining_output({"nnUNet_results": tmp_path / "skip"}, S3D))["nnssl_run_state"]
    assert list(state["unreadable_cases"]) == ["case001"]

    stopped = run_command(TRAIN_S3D, extra_env=results_env(dataset, tmp_path / "stop", nnssl_max_unreadable_cases="0",
                                                          **smoke), check=False)
    assert stopped.returncode == 1
    assert (f"nnssl: error: 1 of 2 preprocessed cases could not be read, more than the limit of 0 "
            f"(nnssl_max_unreadable_cases); training stopped.") in stopped.stderr

    segmentation = ["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "nnsslTrainer", "-p",
                    "nnsslPlansTiny", "-device", "cpu"]
    failed = run_command(segmentation, extra_env=results_env(dataset, tmp_path / "seg", **smoke), check=False)
    assert failed.returncode == 1
    assert f"nnssl: error: Cannot read the preprocessed case {case_file}" in failed.stderr, failed.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ torchrun, 2 ranks
CHECKSUMS = re.compile(r"nnssl_train rank (\d)/2: epoch (\d+), weights sha256 (.+)")


def torchrun_s3d(*torchrun_args: str):
    return ["torchrun", "--standalone", "--nproc_per_node", "2", *torchrun_args, "--no-python",
            console_script("nnssl_train"), TINY_DATASET_ID, "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny",
            "-device", "cpu"]


def rank_pids(torchrun: StartedCommand) -> list:
    """The two rank processes: torchrun's children, in start order."""
    children = subprocess.run(["pgrep", "-P", str(torchrun.process.pid)], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid in children.split())


def assert_both_ranks_finished(output: str, epochs: int) -> None:
    lines = {int(rank): (int(epoch), sums) for rank, epoch, sums in CHECKSUMS.findall(output)}
    assert sorted(lines) == [0, 1], output[-4000:]
    assert lines[0] == lines[1] and lines[0][0] == epochs


@pytest.mark.slow
def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_resumes(_shared_tiny_dataset, tmp_path):
    """``kill -9`` of one rank in epoch 2 under ``--max-restarts 1``: torchrun's new ranks join (no orphaned worker
    holds the dead rank's connections, no stale address from the first attempt), resume from the run's checkpoint
    and finish all epochs with equal weights on both ranks."""
    env = results_env(_shared_tiny_dataset, tmp_path / "results", nnssl_num_epochs="4",
                      nnssl_iterations_per_epoch="3", nnssl_val_iterations_per_epoch="1")
    command = StartedCommand(torchrun_s3d("--max-restarts", "1"), tmp_path / "torchrun.log", env)
    command.wait_for("Epoch 2")
    os.kill(rank_pids(command)[1], signal.SIGKILL)
    assert command.finish(timeout=400) == 0, command.output[-6000:]
    output = command.output
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT=1): resuming this run from" in output
    assert re.search(r"starting at epoch [12]\b", output), output[-4000:]  # not from epoch 0
    assert_both_ranks_finished(output, 4)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank 1", "torchrun"])
def test_sigusr1_to_a_two_rank_run_stops_both_ranks_at_one_step_and_the_rerun_finishes(_shared_tiny_dataset,
                                                                                      tmp_path, target):
    """SIGUSR1 to one rank: the ranks agree on the step, both checkpoint-and-exit with 75 (torchrun lists their exit
    codes). SIGUSR1 to torchrun, which dies of it: its ranks get SIGTERM and do the same. Either way the plain rerun
    of the same command resumes and finishes with equal weights on both ranks."""
    env = results_env(_shared_tiny_dataset, tmp_path / "results", nnssl_num_epochs="3",
                      nnssl_iterations_per_epoch="3", nnssl_val_iterations_per_epoch="1")
    command = StartedCommand(torchrun_s3d(), tmp_path / "torchrun.log", env)
    command.wait_for("Epoch 1")
    ranks = rank_pids(command)
    os.kill(ranks[1] if target == "rank 1" else command.process.pid, signal.SIGUSR1)
    assert command.finish(timeout=300) != 0
    for pid in ranks:  # the ranks are gone too (torchrun waits for them; without torchrun, poll)
        deadline = time.monotonic() + 120
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    output = command.output
    stops = set(re.findall(r"stopping before iteration (\d) of epoch (\d)", output))
    assert len(stops) == 1 and output.count("Preempted: checkpoint written, exiting with code 75") >= 2, output[-4000:]
    if target == "rank 1":
        assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", output)) == 2, output[-4000:]  # torchrun's summary
        assert "SIGUSR1: stopping" in output and "a preemption signal to another rank: stopping" in output
    else:
        assert command.process.returncode == -signal.SIGUSR1 and "SIGTERM: stopping" in output
    rerun = run_command(torchrun_s3d(), extra_env=env, timeout=300)
    assert "this run stopped at a preemption request (SIG" in rerun.stdout
    assert_both_ranks_finished(rerun.stdout, 3)


# ------------------------------------------------------------------------------------------------ the parts
def test_forked_workers_die_with_their_trainer(tmp_path):
    """A worker forked by a training process that is killed (-9) does not live on as an orphan."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from nnssl.integration.fork_safety import prepare_forked_children
        prepare_forked_children()
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the forked child outlived its killed parent")


def test_settings_are_read_with_errors_that_name_them(monkeypatch):
    from nnssl.integration.auto_resume import auto_resume_setting, restart_reason
    from nnssl.integration.environment import EnvironmentVariableError
    from nnssl.integration.preemption import preemption_signals
    from nnssl.integration.unreadable_cases import unreadable_case_limit

    assert preemption_signals() == (signal.SIGUSR1, signal.SIGTERM)
    monkeypatch.setenv("nnssl_preemption_signal", "TERM")
    assert preemption_signals() == (signal.SIGTERM,)
    monkeypatch.setenv("nnssl_preemption_signal", "none")
    assert preemption_signals() == ()
    monkeypatch.setenv("nnssl_preemption_signal", "HUP")
    with pytest.raises(EnvironmentVariableError, match="nnssl_preemption_signal='HUP'"):
        preemption_signals()

    assert unreadable_case_limit(100) == 10 and unreadable_case_limit(5000) == 50
    monkeypatch.setenv("nnssl_max_unreadable_cases", "2%")
    assert unreadable_case_limit(5000) == 100
    monkeypatch.setenv("nnssl_max_unreadable_cases", "many")
    with pytest.raises(EnvironmentVariableError, match="nnssl_max_unreadable_cases='many'"):
        unreadable_case_limit(10)

    assert restart_reason({}) is None and restart_reason({"SLURM_RESTART_COUNT": "0"}) is None
    assert restart_reason({"SLURM_RESTART_COUNT": "2"}) == "SLURM requeue 2 (SLURM_RESTART_COUNT=2)"
    monkeypatch.setenv("nnssl_auto_resume", "yes please")
    with pytest.raises(EnvironmentVariableError, match="nnssl_auto_resume"):
        auto_resume_setting()


def test_a_checkpoint_of_another_run_is_not_resumed_automatically(_shared_tiny_dataset):
    """Changed plans (here: the patch size) make the folder's checkpoint another run: named differences, no resume."""
    import copy
    import json

    from nnssl.integration.auto_resume import RunMismatchError, check_same_run, run_identity

    plans = json.loads((_shared_tiny_dataset["nnUNet_preprocessed"] / TINY_DATASET / "nnsslPlansTiny.json").read_text())
    init_args = {"plans": plans, "configuration": "3d_fullres", "fold": "all"}
    saved = {"trainer_name": S3D, "init_args": init_args}
    check_same_run(saved, run_identity(S3D, init_args), "checkpoint_latest.pth")
    changed = copy.deepcopy(plans)
    changed["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
    with pytest.raises(RunMismatchError, match=r"checkpoint_latest.pth belongs to a different run \(plans content "):
        check_same_run(saved, run_identity(S3D, {**init_args, "plans": changed}), "checkpoint_latest.pth")
    with pytest.raises(RunMismatchError, match="fold 'all' there, '0' now"):
        check_same_run(saved, run_identity(S3D, {**init_args, "fold": 0}), "checkpoint_latest.pth")
