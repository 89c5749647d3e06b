"""benchmarks/transfer_probe.py: arms, budgets, paired statistics and the figure (its runs are benchmarks, not tests)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("transfer_probe", BENCHMARKS / "transfer_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfer_probe"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["transfer_probe"]
    sys.path.remove(str(BENCHMARKS))


def test_arms_know_which_trainers_load_pretrained_weights(probe):
    arms = probe.parse_arms(["nnsslFinetuneTrainer", "nnsslFinetuneTrainer_paper@MAEPretrainTrainer",
                             "nnsslFinetuneTrainer_scratch", "nnsslTrainer"], ["S3DPretrainTrainer"])
    assert [(a.trainer, a.pretrainer) for a in arms] == [
        ("nnsslFinetuneTrainer", "S3DPretrainTrainer"), ("nnsslFinetuneTrainer_paper", "MAEPretrainTrainer"),
        ("nnsslFinetuneTrainer_scratch", None), ("nnsslTrainer", None)]
    with pytest.raises(SystemExit, match="random initialisation"):
        probe.parse_arms(["nnsslTrainer@S3DPretrainTrainer"], ["S3DPretrainTrainer"])
    with pytest.raises(SystemExit, match="no nnssl trainer called 'Nope'"):
        probe.parse_arms(["Nope"], ["S3DPretrainTrainer"])


def test_budgets_from_the_command_line(probe):
    args = probe.build_parser().parse_args(["--quick", "--finetune", "2x3", "4x5", "--labeled", "1", "2"])
    budget = probe.budget_from(args)
    assert budget.finetune == ((2, 3), (4, 5)) and budget.labeled == (1, 2) and budget.seeds == probe.QUICK.seeds
    with pytest.raises(SystemExit, match="EPOCHSxITERATIONS"):
        probe.budget_from(probe.build_parser().parse_args(["--finetune", "5"]))


def test_parallelism_defaults_and_refusals(probe):
    def resolve(*argv):
        return probe.parallelism(probe.build_parser().parse_args(list(argv)))

    assert resolve() == (2, 1) and resolve("--jobs", "1") == (1, None)
    assert resolve("--device", "cuda") == (1, None) and resolve("--jobs", "2", "--torch-threads", "2") == (2, 2)
    for option in ("--jobs", "--torch-threads"):
        with pytest.raises(SystemExit, match=f"{option} must be at least 1, not 0"):
            resolve(option, "0")


def test_paired_report_ratio_and_figure(probe, tmp_path, capsys):
    budget = probe.Budget(seeds=(0, 1, 2), num_unlabeled=2, labeled=(1, 2), num_heldout=1, pretrain_epochs=1,
                          pretrain_iterations=1, finetune=((1, 2), (2, 2)), planner="nnsslPlannerMini")
    arms = probe.parse_arms(["nnsslFinetuneTrainer", "nnsslTrainer"], ["S3DPretrainTrainer"])
    runs = []
    for seed in budget.seeds:
        for labeled in budget.labeled:
            for epochs, iterations in budget.finetune:
                base = 0.2 * labeled + 0.1 * epochs + 0.01 * seed
                for arm, dice in ((arms[0].name, base + (0.05 if seed < 2 else -0.01)), ("nnsslTrainer", base)):
                    runs.append(probe.Run(arm, seed, labeled, probe.budget_name(epochs, iterations),
                                          epochs * iterations, dice, 1.0))
    ratios = probe.report(runs, arms, "nnsslTrainer", budget)
    printed = capsys.readouterr().out
    assert "0.030 +- 0.035" in printed and "2/3" in printed  # mean +- sd of the paired differences, sign count
    (name, (ratio,)), = ratios.items()
    assert name == "dice_nnsslFinetuneTrainer@S3DPretrainTrainer_over_nnsslTrainer" and ratio > 1
    probe.plot(runs, arms, budget, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps([probe.asdict(r) for r in runs])


def test_run_all_trains_every_job_once_with_parallel_slots_and_stops_after_a_failure(probe, tmp_path, monkeypatch):
    import threading
    import time

    budget = probe.Budget(seeds=(0, 1, 2), num_unlabeled=2, labeled=(1, 2), num_heldout=1, pretrain_epochs=1,
                          pretrain_iterations=1, finetune=((1, 2), (2, 2)), planner="nnsslPlannerMini")
    arms = probe.parse_arms(["nnsslFinetuneTrainer", "nnsslTrainer"], ["S3DPretrainTrainer"])
    workspaces = [probe.Workspace(tmp_path / f"seed{s}", "cpu", s, 1) for s in budget.seeds]
    running, peak, lock = [0], [0], threading.Lock()

    def occupy() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    def prepare(workspace, budget, pretrainers, cache):
        occupy()
        return {"S3DPretrainTrainer": tmp_path / f"checkpoint{workspace.seed}.pth"}

    def finetune(job, checkpoints):
        occupy()
        if job.arm.pretrainer:
            assert checkpoints["S3DPretrainTrainer"].name == f"checkpoint{job.workspace.seed}.pth"
        return probe.Run(job.arm.name, job.workspace.seed, job.labeled, probe.budget_name(job.epochs, job.iterations),
                         job.epochs * job.iterations, 0.5, 0.0)

    monkeypatch.setattr(probe, "prepare_seed", prepare)
    monkeypatch.setattr(probe, "run_finetune", finetune)
    monkeypatch.setattr(probe, "heldout_threshold_dice", lambda workspace, budget: 0.1 * workspace.seed)
    runs, threshold = probe.run_all(workspaces, budget, arms, ["S3DPretrainTrainer"], tmp_path, jobs=2)
    keys = sorted((r.arm, r.seed, r.labeled, r.budget) for r in runs)
    assert len(keys) == 3 * 2 * 2 * 2 and len(set(keys)) == len(keys)  # seeds x budgets x arms x labeled, once each
    assert threshold == [0.0, 0.1, 0.2] and peak[0] == 2  # in seed order; never more than 2 commands at once

    started = []

    def failing(job, checkpoints):
        started.append(job)
        time.sleep(0.01)
        raise probe.ProbeFailure("finetune failed; full log: somewhere")

    monkeypatch.setattr(probe, "run_finetune", failing)
    with pytest.raises(probe.ProbeFailure, match="full log"):
        probe.run_all(workspaces, budget, arms, ["S3DPretrainTrainer"], tmp_path, jobs=2)
    assert len(started) < 3 * 2 * 2 * 2  # queued jobs were cancelled
