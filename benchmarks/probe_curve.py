"""Probe curve: frozen-encoder probe Dice against pretraining length, and its ranking against full fine-tuning.

Everything runs through the user's commands, per seed in its own nnU-Net folders (``transfer_probe.py``'s workspace):

1. ``nnssl_demo_data --seed SEED``: unlabeled synthetic heads (mixed spacings, orientations, sizes, formats) and the
   labeled demo task, the lateral ventricles (no intensity threshold finds them); ingested and planned with
   ``nnsslPlannerMini`` on the CPU;
2. pretraining checkpoints (``nnssl_seed=SEED``, cached like ``transfer_probe.py``'s): S3D at every length of
   ``--lengths`` and the other methods of ``--methods`` at ``--method-length``;
3. ``nnssl_probe -d 502 -c CHECKPOINT -i ITERATIONS --seed SEED`` on every checkpoint; its floor (the same probe on
   the plans' randomly initialised encoder) is the point at 0 pretraining iterations;
4. for the seeds of ``--finetune-seeds``: a full fine-tuning of every checkpoint (``nnsslFinetuneTrainer`` with
   ``nnssl_pretrained_checkpoint``) and of a random initialisation with the same recipe
   (``nnsslFinetuneTrainer_scratch``), on the probe's split; Dice as in ``transfer_probe.py`` (nnU-Net's validation
   of the final weights, without mirroring).

The probe and the fine-tunings train on the same labeled cases and are scored on the same held-out cases. Reported:
probe Dice per seed and checkpoint with the paired difference to the floor; the fine-tuning Dice next to it with the
rank agreement (Spearman's rho and concordant pairs) of the two over the checkpoints of a seed; a PNG of probe Dice
against pretraining iterations (``--output``), a JSON of every number and ``ratio`` lines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

from _common import print_ratio_lines, print_table
from transfer_probe import (LABELED_ID, Budget, Workspace, generate_and_plan, in_work_folder, prepare_labeled,
                            pretrained_checkpoint, validation_dice)

Job = tuple  # (function, args, follow-up: result -> more jobs)
RANDOM = "random"  # the checkpoint name of the floor: the plans' network at its seeded random initialisation


@dataclass(frozen=True)
class Checkpoint:
    """One pretraining of a seed: method and length (epochs x iterations per epoch)."""

    method: str
    epochs: int
    iterations: int

    @property
    def length(self) -> int:
        return self.epochs * self.iterations

    @property
    def name(self) -> str:
        return f"{self.method}@{self.length}"


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    num_unlabeled: int
    num_labeled: int
    num_heldout: int
    iterations_per_epoch: int
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    method_length: int
    probe_iterations: int
    finetune_seeds: tuple[int, ...]
    finetune: tuple[int, int]
    planner: str = "nnsslPlannerMini"

    def checkpoints(self) -> list[Checkpoint]:
        """Longest first, so the pool starts the longest trainings first."""
        def at(method: str, length: int) -> Checkpoint:
            return Checkpoint(method, max(1, length // self.iterations_per_epoch),
                              min(length, self.iterations_per_epoch))
        wanted = [at("S3DPretrainTrainer", n) for n in self.lengths]
        wanted += [at(method, self.method_length) for method in self.methods]
        return sorted(dict.fromkeys(wanted), key=lambda c: -c.length)

    def budget(self, seed: int) -> Budget:
        """``transfer_probe``'s view of one seed: its data sizes, split and fine-tuning budget."""
        return Budget(seeds=(seed,), num_unlabeled=self.num_unlabeled, labeled=(self.num_labeled,),
                      num_heldout=self.num_heldout, pretrain_epochs=1, pretrain_iterations=1,
                      finetune=(self.finetune,), planner=self.planner)


CPU = Settings(seeds=(0, 1, 2), num_unlabeled=32, num_labeled=4, num_heldout=4, iterations_per_epoch=40,
               lengths=(40, 160, 640), methods=("MAEPretrainTrainer", "ModelsGenesisPretrainTrainer"),
               method_length=160, probe_iterations=300, finetune_seeds=(0, 1, 2), finetune=(10, 20))
QUICK = Settings(seeds=(0,), num_unlabeled=2, num_labeled=2, num_heldout=1, iterations_per_epoch=2, lengths=(2, 4),
                 methods=("MAEPretrainTrainer",), method_length=2, probe_iterations=2, finetune_seeds=(0,),
                 finetune=(1, 2))


@dataclass(frozen=True)
class Measurement:
    """One checkpoint of one seed: probe Dice (and the floor it ran against) and, if run, fine-tuning Dice."""

    seed: int
    checkpoint: str
    method: str
    length: int
    pretrain_seconds: float
    probe_dice: float | None = None
    probe_floor: float | None = None
    probe_seconds: float | None = None
    finetune_dice: float | None = None


class SeedRun:
    """One seed's data, checkpoints, probes and fine-tunings; steps run as pool jobs in dependency order."""

    def __init__(self, workspace: Workspace, settings: Settings, cache: Path, output: Path) -> None:
        self.workspace, self.settings, self.cache, self.output = workspace, settings, cache, output
        self.budget = settings.budget(workspace.seed)
        self.labeled_ready = threading.Lock()
        self.prepared = False
        self.measurements: dict[str, Measurement] = {}
        self.measurements_lock = threading.Lock()  # a checkpoint's probe and fine-tuning finish in different threads
        self.random_finetune_submitted = False

    @property
    def seed(self) -> int:
        return self.workspace.seed

    def record(self, name: str, **fields: object) -> None:
        """Add ``fields`` to the checkpoint's measurement (the random initialisation's starts empty)."""
        with self.measurements_lock:
            previous = self.measurements.get(name) or floor_measurement(self.seed)
            self.measurements[name] = replace(previous, **fields)

    def pretrain(self, checkpoint: Checkpoint) -> Path:
        """Train (or take from the cache) the checkpoint; the first one of the seed also plans the labeled data."""
        start = time.perf_counter()
        path = pretrained_checkpoint(self.workspace, replace(self.budget, pretrain_epochs=checkpoint.epochs,
                                                             pretrain_iterations=checkpoint.iterations),
                                     checkpoint.method, self.cache)
        self.record(checkpoint.name, checkpoint=checkpoint.name, method=checkpoint.method, length=checkpoint.length,
                    pretrain_seconds=time.perf_counter() - start)
        with self.labeled_ready:  # every checkpoint has the same architecture: one set of fine-tuning plans
            if not self.prepared:
                prepare_labeled(self.workspace, self.budget, path)
                self.prepared = True
        return path

    def probe(self, checkpoint: Checkpoint, path: Path) -> None:
        record = self.output / f"probe_seed{self.seed}_{checkpoint.name}.json"
        seconds = self.workspace.run(f"probe_{checkpoint.name}", [
            "nnssl_probe", "-d", LABELED_ID, "-c", path, "-device", self.workspace.device, "-i",
            self.settings.probe_iterations, "--seed", self.seed, "-o", record])
        result = json.loads(record.read_text())
        self.record(checkpoint.name, probe_dice=result["pretrained"]["dice"], probe_floor=result["random"]["dice"],
                    probe_seconds=seconds)
        print(f"  seed {self.seed}: probe {checkpoint.name:<40} Dice {result['pretrained']['dice']:.3f} (random "
              f"encoder {result['random']['dice']:.3f}; {seconds:.0f} s)", flush=True)

    def finetune(self, name: str, path: Path | None) -> None:
        """``nnsslFinetuneTrainer`` on ``path``, or its ``_scratch`` twin for the random initialisation."""
        trainer = "nnsslFinetuneTrainer" if path else "nnsslFinetuneTrainer_scratch"
        results = self.workspace.root / f"results_finetune_{name}"
        extra = {"nnUNet_results": str(results)}
        if path:
            extra["nnssl_pretrained_checkpoint"] = str(path)
        epochs, iterations = self.settings.finetune
        self.workspace.train(f"finetune_{name}", LABELED_ID, "0", trainer, "nnsslFinetunePlans", epochs, iterations,
                             extra)
        dice = validation_dice(results, trainer, 0)
        self.record(name, finetune_dice=dice)
        print(f"  seed {self.seed}: fine-tuning {name:<36} Dice {dice:.3f}", flush=True)


def run_all(runs: Sequence[SeedRun], jobs: int) -> None:
    """Every seed's data, then its pretrainings (longest first), then each checkpoint's probe and fine-tuning as soon
    as it exists; at most ``jobs`` commands at a time. A job's follow-ups are decided here, in the main thread."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    pending: dict[Future, Callable[[object], list[Job]]] = {}

    def submit(job: Job) -> None:
        function, args, follow = job
        pending[pool.submit(function, *args)] = follow

    def after_data(run: SeedRun) -> Callable[[object], list[Job]]:
        return lambda _: [(run.pretrain, (c,), after_pretraining(run, c)) for c in run.settings.checkpoints()]

    def after_pretraining(run: SeedRun, checkpoint: Checkpoint) -> Callable[[object], list[Job]]:
        def follow(path: object) -> list[Job]:
            jobs_now: list[Job] = [(run.probe, (checkpoint, path), no_follow_up)]
            if run.seed in run.settings.finetune_seeds:
                jobs_now.append((run.finetune, (checkpoint.name, path), no_follow_up))
                if not run.random_finetune_submitted:  # the labeled data are planned once a checkpoint exists
                    run.random_finetune_submitted = True
                    jobs_now.append((run.finetune, (RANDOM, None), no_follow_up))
            return jobs_now
        return follow

    try:
        for run in runs:
            submit((generate_and_plan, (run.workspace, run.budget), after_data(run)))
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                follow = pending.pop(future)
                for job in follow(future.result()):  # a ProbeFailure propagates; running commands finish
                    submit(job)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def no_follow_up(_result: object) -> list[Job]:
    return []


def floor_measurement(seed: int) -> Measurement:
    """The random initialisation as a checkpoint of length 0, nothing measured yet."""
    return Measurement(seed, RANDOM, RANDOM, 0, 0.0)


def with_floor(run: SeedRun) -> list[Measurement]:
    """The seed's checkpoints plus the random encoder as a checkpoint of length 0 (its probe Dice is the floor, the
    same in every probe of the seed: same seed, same network before loading; a mismatch is reported, not hidden)."""
    measured = [m for m in run.measurements.values() if m.checkpoint != RANDOM]
    floors = sorted({m.probe_floor for m in measured if m.probe_floor is not None})
    if len(floors) > 1:
        print(f"  seed {run.seed}: WARNING the random floor differs between probes: {floors}", flush=True)
    floor = floors[0] if floors else None
    random = replace(run.measurements.get(RANDOM) or floor_measurement(run.seed), probe_dice=floor, probe_floor=floor)
    return sorted([random] + measured, key=lambda m: (m.method != RANDOM, m.method, m.length))


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties (NaN when either side is constant)."""
    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result
    a, b = ranks(first), ranks(second)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return statistics.correlation(a, b)


def agreement(measurements: Sequence[Measurement]) -> tuple[float, int, int, int]:
    """(Spearman's rho, concordant pairs, discordant pairs, tied pairs) of probe against fine-tuning Dice."""
    both = [m for m in measurements if m.probe_dice is not None and m.finetune_dice is not None]
    concordant = discordant = tied = 0
    for a, b in combinations(both, 2):
        sign = (a.probe_dice - b.probe_dice) * (a.finetune_dice - b.finetune_dice)
        concordant, discordant, tied = concordant + (sign > 0), discordant + (sign < 0), tied + (sign == 0)
    rho = spearman([m.probe_dice for m in both], [m.finetune_dice for m in both]) if len(both) > 2 else float("nan")
    return rho, concordant, discordant, tied


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(per_seed: dict[int, list[Measurement]]) -> dict[str, list[float]]:
    """Tables of probe and fine-tuning Dice, the paired difference to the floor, and the rank agreement."""
    names = list(dict.fromkeys(m.checkpoint for rows in per_seed.values() for m in rows))
    by_key = {(m.seed, m.checkpoint): m for rows in per_seed.values() for m in rows}
    seeds = sorted(per_seed)
    rows = []
    for name in names:
        cells = [by_key.get((seed, name)) for seed in seeds]
        probes = [c.probe_dice for c in cells if c and c.probe_dice is not None]
        deltas = [c.probe_dice - c.probe_floor for c in cells if c and c.probe_dice is not None and name != RANDOM]
        wins = f"{sum(d > 0 for d in deltas)}/{len(deltas)}" if deltas else "-"
        rows.append([name, " / ".join(fmt(c.probe_dice if c else None) for c in cells),
                     f"{statistics.fmean(probes):.3f}" if probes else "-",
                     f"{statistics.fmean(deltas):+.3f}" if deltas else "-", wins,
                     " / ".join(fmt(c.finetune_dice if c else None) for c in cells),
                     " / ".join(f"{c.pretrain_seconds:.0f}" if c and c.pretrain_seconds else "-" for c in cells)])
    print_table(f"Probe Dice and fine-tuning Dice per seed {seeds} (held-out cases)",
                ["checkpoint", "probe Dice", "mean", "minus random", "beats random", "fine-tuning Dice",
                 "pretraining s"], rows)
    agreement_rows = []
    ratios: dict[str, list[float]] = {}
    for seed in seeds:
        rho, concordant, discordant, tied = agreement(per_seed[seed])
        if concordant + discordant + tied:
            agreement_rows.append([seed, f"{rho:.2f}", concordant, discordant, tied])
        if math.isfinite(rho):  # NaN: one side is constant (e.g. no fine-tuning segmented anything), no ranking
            ratios.setdefault("probe_vs_finetune_spearman", []).append(rho)
    if agreement_rows:
        print_table("Rank agreement of the probe with full fine-tuning over the checkpoints of a seed",
                    ["seed", "Spearman rho", "concordant pairs", "discordant pairs", "tied pairs"], agreement_rows)
    for name in names:
        pairs = [(by_key[(s, name)].probe_dice, by_key[(s, name)].probe_floor) for s in seeds
                 if (s, name) in by_key and by_key[(s, name)].probe_dice is not None and name != RANDOM]
        if pairs and statistics.fmean(b for _, b in pairs) > 0:
            ratios[f"probe_dice_{name}_over_random"] = [statistics.fmean(a for a, _ in pairs)
                                                        / statistics.fmean(b for _, b in pairs)]
    return ratios


def plot(per_seed: dict[int, list[Measurement]], path: Path) -> None:
    """Probe Dice against pretraining iterations: S3D per seed (thin) and their mean (thick) from the random encoder
    at 0; the other methods as markers at their length (every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    s3d: dict[int, list[float]] = {}
    for index, (seed, rows) in enumerate(sorted(per_seed.items())):
        curve = [m for m in rows if m.method in (RANDOM, "S3DPretrainTrainer") and m.probe_dice is not None]
        axis.plot([m.length for m in curve], [m.probe_dice for m in curve], color="C0", alpha=0.35, lw=1,
                  marker=".", label="S3D, each seed" if index == 0 else None)
        for m in curve:
            s3d.setdefault(m.length, []).append(m.probe_dice)
    lengths = sorted(s3d)
    axis.plot(lengths, [statistics.fmean(s3d[n]) for n in lengths], color="C0", lw=2.5, marker="o",
              label="S3D, mean over seeds")
    others = sorted({m.method for rows in per_seed.values() for m in rows} - {RANDOM, "S3DPretrainTrainer"})
    for index, method in enumerate(others):
        points = [m for rows in per_seed.values() for m in rows if m.method == method and m.probe_dice is not None]
        axis.scatter([m.length * (1.08 + 0.08 * index) for m in points], [m.probe_dice for m in points],
                     color=f"C{index + 1}", marker="s^D"[index % 3], label=method.replace("PretrainTrainer", ""))
    axis.set_xscale("symlog", linthresh=max(1, min(n for n in lengths if n > 0) if len(lengths) > 1 else 1))
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.minorticks_off()
    axis.set_xlabel("pretraining iterations (0 = random encoder)")
    axis.set_ylabel("probe Dice (held-out cases)")
    axis.set_ylim(-0.02, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else CPU
    overrides = {name: tuple(value) if isinstance(value, list) else value for name, value in (
        ("seeds", args.seeds), ("lengths", args.lengths), ("methods", args.methods),
        ("method_length", args.method_length), ("probe_iterations", args.probe_iterations),
        ("finetune_seeds", args.finetune_seeds), ("num_unlabeled", args.num_unlabeled)) if value is not None}
    return replace(settings, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke check of the pipeline in minutes (not evidence)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (data, pretraining, probe, fine-tuning)")
    parser.add_argument("--lengths", type=int, nargs="+", help="S3D pretraining lengths in iterations")
    parser.add_argument("--methods", nargs="+", help="other pretraining trainers, at --method-length")
    parser.add_argument("--method-length", type=int, help="their pretraining length in iterations")
    parser.add_argument("--num-unlabeled", type=int, help="unlabeled volumes per seed")
    parser.add_argument("--probe-iterations", type=int, help="head updates per probe arm (nnssl_probe -i)")
    parser.add_argument("--finetune-seeds", type=int, nargs="*", help="seeds whose checkpoints are also fine-tuned")
    parser.add_argument("--jobs", type=int, default=2, help="commands at a time, one torch thread each")
    parser.add_argument("--cache", type=Path, help="folder for pretrained checkpoints (default: in the work folder)")
    parser.add_argument("--output", type=Path, default=Path("probe_curve"),
                        help="folder for probe_curve.{png,json} and the probes' JSON (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs, results)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="print the tables and draw the figure of an earlier run's probe_curve.json; train nothing")
    return parser


def measurements_from(record: Path) -> dict[int, list[Measurement]]:
    """An earlier run's measurements per seed, in its order."""
    per_seed: dict[int, list[Measurement]] = {}
    for row in json.loads(record.read_text())["measurements"]:
        per_seed.setdefault(row["seed"], []).append(Measurement(**row))
    return per_seed


def finish(per_seed: dict[int, list[Measurement]], output: Path) -> None:
    """Tables, figure and ratio lines."""
    ratios = report(per_seed)
    plot(per_seed, output / "probe_curve.png")
    print(f"\nwrote {output / 'probe_curve.png'}")
    print_ratio_lines(ratios or {"nothing_measured": [float("nan")]})


def main() -> int:
    args = build_parser().parse_args()
    if args.report:
        args.output.mkdir(parents=True, exist_ok=True)
        finish(measurements_from(args.report), args.output)
        return 0
    settings = settings_from(args)
    start = time.perf_counter()
    print(f"probe curve{' (--quick: smoke check, NOT evidence)' if args.quick else ''}: {asdict(settings)}; CPU, "
          f"{args.jobs} command(s) at a time, one torch thread each", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    runs: list[SeedRun] = []

    def measure(root: Path) -> None:
        cache = args.cache or root / "pretrained"
        runs.extend(SeedRun(Workspace(root / f"seed{seed}", "cpu", seed, 1), settings, cache, args.output.resolve())
                    for seed in settings.seeds)
        run_all(runs, args.jobs)

    if not in_work_folder("probe_curve", args.keep, measure):
        return 1
    per_seed = {run.seed: with_floor(run) for run in runs}
    (args.output / "probe_curve.json").write_text(json.dumps({
        "settings": asdict(settings), "measurements": [asdict(m) for rows in per_seed.values() for m in rows],
        "wall_seconds": time.perf_counter() - start}, indent=2) + "\n")
    print(f"\nwrote {args.output / 'probe_curve.json'}; wall time {time.perf_counter() - start:.0f} s")
    finish(per_seed, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
