"""benchmarks/probe_curve.py: the job graph, the floor, rank agreement, the report and the figure (its runs are
benchmarks, not tests; the commands it calls are tested through their own entry points)."""

import importlib.util
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def curve():
    sys.path.insert(0, str(BENCHMARKS))
    loaded = {}
    for name in ("transfer_probe", "probe_curve"):  # dataclasses resolve annotations through sys.modules
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        loaded[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[name])
    yield loaded["probe_curve"]
    for name in loaded:
        del sys.modules[name]
    sys.path.remove(str(BENCHMARKS))


def test_checkpoints_longest_first_at_whole_epochs(curve):
    names = [(c.name, c.epochs, c.iterations) for c in curve.CPU.checkpoints()]
    assert names[0] == ("S3DPretrainTrainer@640", 16, 40)
    assert ("S3DPretrainTrainer@40", 1, 40) in names and ("MAEPretrainTrainer@160", 4, 40) in names
    again = curve.replace(curve.CPU, methods=("S3DPretrainTrainer",), method_length=160)
    assert len(again.checkpoints()) == 3  # S3D at the methods' length is not pretrained twice


def test_spearman_and_pair_agreement(curve):
    assert curve.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1)
    assert curve.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert curve.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # average ranks for the tie
    assert math.isnan(curve.spearman([1, 1, 1], [1, 2, 3]))
    rows = [curve.Measurement(0, name, "S3DPretrainTrainer", n, 1.0, probe_dice=p, finetune_dice=f)
            for name, n, p, f in (("a", 1, 0.1, 0.5), ("b", 2, 0.2, 0.7), ("c", 3, 0.3, 0.6), ("d", 4, 0.3, 0.8))]
    rho, concordant, discordant, tied = curve.agreement(rows)
    assert (concordant, discordant, tied) == (4, 1, 1) and 0 < rho < 1


class FakeWorkspace:
    """Stands in for transfer_probe's Workspace: writes what the real commands would, counts what runs at once."""

    running = peak = 0
    lock = threading.Lock()

    def __init__(self, root: Path, seed: int, calls: list) -> None:
        self.root, self.seed, self.device, self.calls = root, seed, "cpu", calls

    def occupy(self, step: str) -> None:
        with FakeWorkspace.lock:
            FakeWorkspace.running += 1
            FakeWorkspace.peak = max(FakeWorkspace.peak, FakeWorkspace.running)
            self.calls.append((self.seed, step))
        time.sleep(0.01)
        with FakeWorkspace.lock:
            FakeWorkspace.running -= 1

    def run(self, step, args, extra_env=None) -> float:
        self.occupy(step)
        assert args[0] == "nnssl_probe" and "-i" in args
        record = Path(args[args.index("-o") + 1])
        length = int(step.rpartition("@")[2])
        record.write_text(json.dumps({"pretrained": {"dice": 0.5 + length / 1000}, "random": {"dice": 0.4}}))
        return 2.0

    def train(self, step, dataset_id, fold, trainer, plans, epochs, iterations, extra_env) -> float:
        self.occupy(step)
        assert (trainer == "nnsslFinetuneTrainer") == ("nnssl_pretrained_checkpoint" in extra_env)
        summary = (Path(extra_env["nnUNet_results"]) / "Dataset502_nnsslDemoLabeled" / f"{trainer}__{plans}__3d_fullres"
                   / "fold_0" / "validation" / "summary.json")
        summary.parent.mkdir(parents=True)
        summary.write_text(json.dumps({"foreground_mean": {"Dice": 0.9 if "@" in step else 0.8}}))
        return 3.0


def test_run_all_probes_and_finetunes_every_checkpoint_once_after_its_data(curve, tmp_path, monkeypatch):
    calls: list = []
    prepared: list = []
    monkeypatch.setattr(curve, "generate_and_plan", lambda workspace, budget: workspace.occupy("data"))

    def pretrained(workspace, budget, method, cache):
        workspace.occupy(f"pretrain_{method}@{budget.pretrain_epochs * budget.pretrain_iterations}")
        return tmp_path / f"{method}_{workspace.seed}_{budget.pretrain_epochs}x{budget.pretrain_iterations}.pth"

    monkeypatch.setattr(curve, "pretrained_checkpoint", pretrained)
    monkeypatch.setattr(curve, "prepare_labeled", lambda workspace, budget, path: prepared.append(workspace.seed))
    settings = curve.replace(curve.CPU, seeds=(0, 1), finetune_seeds=(1,))
    runs = [curve.SeedRun(FakeWorkspace(tmp_path / f"seed{s}", s, calls), settings, tmp_path, tmp_path)
            for s in settings.seeds]
    for run in runs:
        run.workspace.root.mkdir()
    curve.run_all(runs, jobs=2)

    assert sorted(prepared) == [0, 1] and FakeWorkspace.peak == 2  # plans once per seed; never over 2 at a time
    steps = [(seed, step) for seed, step in calls]
    assert len(steps) == len(set(steps))
    for seed in (0, 1):
        mine = [step for s, step in steps if s == seed]
        assert mine[0] == "data" and sum(step.startswith("pretrain_") for step in mine) == 5
        assert sum(step.startswith("probe_") for step in mine) == 5
        assert sum(step.startswith("finetune_") for step in mine) == (6 if seed == 1 else 0)  # + random init
    per_seed = {run.seed: curve.with_floor(run) for run in runs}
    random = per_seed[1][0]
    assert (random.checkpoint, random.probe_dice, random.finetune_dice) == ("random", 0.4, 0.8)
    assert [m.length for m in per_seed[1] if m.method == "S3DPretrainTrainer"] == [40, 160, 640]


def test_report_ratio_lines_and_figure(curve, tmp_path, capsys):
    per_seed = {}
    for seed in (0, 1, 2):
        rows = [curve.Measurement(seed, "random", "random", 0, 0.0, probe_dice=0.4, probe_floor=0.4,
                                  finetune_dice=0.7)]
        for length, gain in ((40, 0.1), (160, 0.2 if seed else -0.1)):
            rows.append(curve.Measurement(seed, f"S3DPretrainTrainer@{length}", "S3DPretrainTrainer", length, 9.0,
                                          probe_dice=0.4 + gain, probe_floor=0.4, finetune_dice=0.7 + gain))
        rows.append(curve.Measurement(seed, "MAEPretrainTrainer@160", "MAEPretrainTrainer", 160, 9.0,
                                      probe_dice=0.45, probe_floor=0.4))
        per_seed[seed] = rows
    ratios = curve.report(per_seed)
    printed = capsys.readouterr().out
    assert "2/3" in printed and "0.300 / 0.600 / 0.600" in printed  # S3D@160 beats the floor in 2 of 3 seeds
    assert ratios["probe_vs_finetune_spearman"] == [pytest.approx(1.0)] * 3
    assert ratios["probe_dice_S3DPretrainTrainer@40_over_random"] == [pytest.approx(1.25)]
    curve.plot(per_seed, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    record = tmp_path / "probe_curve.json"  # --report redraws an earlier run from its JSON
    record.write_text(json.dumps({"measurements": [curve.asdict(m) for rows in per_seed.values() for m in rows]}))
    assert curve.measurements_from(record) == per_seed
