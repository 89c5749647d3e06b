"""Transfer probe: does S3D pretraining help fine-tuning on a handful of labeled cases (generated data, tiny preset)?

Per seed, entirely through the user's commands (console scripts in subprocesses, with their own temporary
nnUNet_raw / nnUNet_preprocessed / nnUNet_results):

1. ``nnssl_demo_data --seed SEED``: unlabeled head volumes + labeled Dataset502 (num-labeled + num-heldout cases);
2. ``nnssl_ingest`` -> Dataset501, ``nnUNetv2_plan_and_preprocess -pl nnsslPlannerTiny``;
3. ``nnUNetv2_train 501 3d_fullres all -tr S3DPretrainTrainer -p nnsslPlansTiny`` for the pretraining budget
   (once per seed; the checkpoint is reused by the fine-tuning);
4. ``nnssl_prepare_finetune -d 502 -c CHECKPOINT``, then a ``splits_final.json`` whose fold 0 trains on the first
   num-labeled cases and validates on the num-heldout others (nnU-Net's own custom-split mechanism);
5. ``nnUNetv2_train 502 3d_fullres 0 -p nnsslFinetunePlans`` with the fine-tuning trainer and with its from-scratch
   twin (same plans, same schedule, random init), both for the same fine-tuning budget (one after the other: two
   processes at once oversubscribe the cores and were slower on 2 CPU cores);
6. Dice = ``foreground_mean.Dice`` of ``fold_0/validation/summary.json`` (nnU-Net's validation of the final weights
   on the held-out cases).

The seed drives the data generator only: nnU-Net does not seed weight initialisation, augmentation or sampling, and
the trainers read no seed variable, so two runs with the same seed differ; the spread over seeds includes that
run-to-run noise. Budgets are set with nnssl's smoke-run variables (``nnssl_num_epochs`` and friends).

Usage: ``python benchmarks/transfer_probe.py --quick`` (smoke check, under two minutes on 2 CPU cores) or
``python benchmarks/transfer_probe.py`` (three seeds, budgets sized for a GPU: hours on 2 CPU cores); see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from _common import print_ratio_lines, print_table, summarize

UNLABELED_ID, LABELED_ID = 501, 502
UNLABELED_DATASET, LABELED_DATASET = "Dataset501_DemoUnlabeled", "Dataset502_nnsslDemoLabeled"
PRETRAINER, PRETRAIN_PLANS, FINETUNE_PLANS = "S3DPretrainTrainer", "nnsslPlansTiny", "nnsslFinetunePlans"
DEFAULT_SCRATCH = "nnsslFinetuneTrainer_scratch"
VAL_ITERATIONS = 1  # per-epoch validation loss is only logged; the Dice comes from nnU-Net's final validation
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
LEARNED_DICE = 0.1  # below this on both sides nothing was learned and the ratio of two near-zero Dice means nothing


@dataclass(frozen=True)
class Budget:
    """Seeds, data sizes and training lengths of one probe run."""

    seeds: tuple[int, ...]
    num_unlabeled: int
    num_labeled: int
    num_heldout: int
    pretrain_epochs: int
    pretrain_iterations: int
    finetune_epochs: int
    finetune_iterations: int


QUICK = Budget(seeds=(0,), num_unlabeled=2, num_labeled=2, num_heldout=1, pretrain_epochs=1, pretrain_iterations=1,
               finetune_epochs=1, finetune_iterations=1)
# Sized for a GPU (hours on 2 CPU cores). Measured on CPU, seed 0: after 100 and after 1000 fine-tuning iterations the
# from-scratch twin still predicted no foreground on held-out cases (Dice 0), so much smaller budgets measure nothing.
FULL = Budget(seeds=(0, 1, 2), num_unlabeled=8, num_labeled=4, num_heldout=4, pretrain_epochs=20,
              pretrain_iterations=50, finetune_epochs=40, finetune_iterations=50)


@dataclass(frozen=True)
class SeedResult:
    """Held-out Dice of both fine-tunings of one seed, and the wall seconds of each stage."""

    seed: int
    dice_pretrained: float
    dice_scratch: float
    seconds: Mapping[str, float]

    @property
    def ratio(self) -> float:
        """Dice pretrained / Dice scratch; NaN when the scratch twin found nothing (Dice 0)."""
        return self.dice_pretrained / self.dice_scratch if self.dice_scratch > 0 else math.nan


class Workspace:
    """One seed's nnU-Net folders and the environment its commands run in; logs every command to ``logs/``."""

    def __init__(self, root: Path, device: str) -> None:
        self.root = root
        self.device = device
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        # the user's own nnssl_* variables (schedule, batch size, checkpoint override) must not reach the commands
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("nnssl_")}
        self.env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
        for variable in NNUNET_FOLDERS:
            (root / variable).mkdir()
            self.env[variable] = str(root / variable)

    def folder(self, variable: str) -> Path:
        """This workspace's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``."""
        return Path(self.env[variable])

    def run(self, step: str, args: Sequence[object], extra_env: Mapping[str, str] | None = None) -> float:
        """Run a console script, its output going to ``logs/<step>.log``; return wall seconds.

        Raises ``ProbeFailure`` with the tail of the log when the command fails.
        """
        command = [console_script(str(args[0]))] + [str(a) for a in args[1:]]
        log = self.logs / f"{step}.log"
        start = time.perf_counter()
        with log.open("w") as handle:
            handle.write(" ".join(command) + "\n")
            handle.flush()
            code = subprocess.run(command, env={**self.env, **(extra_env or {})}, stdout=handle,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise ProbeFailure(f"{step} failed (exit code {code}); full log: {log}\n{tail}")
        return time.perf_counter() - start

    def train_command(self, dataset_id: int, fold: str, trainer: str, plans: str, epochs: int,
                      iterations: int) -> tuple[list[object], dict[str, str]]:
        """``nnUNetv2_train`` arguments and the nnssl smoke-run variables for ``epochs`` x ``iterations``."""
        budget = {"nnssl_num_epochs": str(epochs), "nnssl_iterations_per_epoch": str(iterations),
                  "nnssl_val_iterations_per_epoch": str(VAL_ITERATIONS)}
        return (["nnUNetv2_train", dataset_id, "3d_fullres", fold, "-tr", trainer, "-p", plans,
                 "-device", self.device], budget)


class ProbeFailure(RuntimeError):
    """A command of the probe failed; the message names its log."""


def console_script(name: str) -> str:
    """Absolute path of an installed console script next to the running interpreter (else the bare name)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def scratch_twin(trainer: str) -> str:
    """``<trainer>_scratch`` if nnssl defines it, else the generic ``nnsslFinetuneTrainer_scratch``."""
    from nnssl.registry import find_class

    if find_class(trainer) is None:
        raise SystemExit(f"transfer_probe: no nnssl trainer called {trainer!r}")
    scratch = f"{trainer}_scratch" if find_class(f"{trainer}_scratch") is not None else DEFAULT_SCRATCH
    if scratch == trainer:
        raise SystemExit(f"transfer_probe: {trainer} is the from-scratch baseline; give a pretrained fine-tuning trainer")
    if scratch == DEFAULT_SCRATCH and trainer != "nnsslFinetuneTrainer":
        print(f"note: there is no {trainer}_scratch; the baseline {DEFAULT_SCRATCH} has the default recipe, which "
              f"may differ from {trainer}'s (learning rate, schedule, optimizer, augmentation)")
    return scratch


def write_split(workspace: Workspace, budget: Budget) -> None:
    """Fold 0 = train on the first num_labeled demo cases, validate on the num_heldout cases after them."""
    cases = [f"demo_{index:03d}" for index in range(budget.num_labeled + budget.num_heldout)]
    split = [{"train": cases[:budget.num_labeled], "val": cases[budget.num_labeled:]}]
    path = workspace.folder("nnUNet_preprocessed") / LABELED_DATASET / "splits_final.json"
    path.write_text(json.dumps(split, indent=2) + "\n")


def validation_dice(workspace: Workspace, trainer: str) -> float:
    """``foreground_mean.Dice`` from nnU-Net's ``fold_0/validation/summary.json`` of ``trainer``."""
    summary = (workspace.folder("nnUNet_results") / LABELED_DATASET / f"{trainer}__{FINETUNE_PLANS}__3d_fullres"
               / "fold_0" / "validation" / "summary.json")
    return float(json.loads(summary.read_text())["foreground_mean"]["Dice"])


def probe_seed(folder: Path, seed: int, budget: Budget, trainer: str, scratch: str, device: str) -> SeedResult:
    """Generate data, pretrain once, fine-tune pretrained and from scratch; return both held-out Dice scores."""
    workspace = Workspace(folder, device)
    source = workspace.root / "source"
    seconds: dict[str, float] = {}

    def stage(name: str, seconds_taken: float) -> None:
        seconds[name] = seconds_taken
        print(f"  seed {seed}: {name:<10} {seconds_taken:6.1f} s", flush=True)

    stage("data", workspace.run("demo_data", [
        "nnssl_demo_data", "-o", source, "--num_unlabeled", budget.num_unlabeled,
        "--num_labeled", budget.num_labeled + budget.num_heldout, "--seed", seed, "-d", LABELED_ID])
        + workspace.run("ingest", [
            "nnssl_ingest", "-i", source / "unlabeled", "--anatomy_masks", source / "unlabeled_masks" / "anatomy",
            "-d", UNLABELED_ID, "-n", "DemoUnlabeled", "-np", 1])
        + workspace.run("plan_and_preprocess", [
            "nnUNetv2_plan_and_preprocess", "-d", UNLABELED_ID, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
            "-np", 1, "-npfp", 1, "--no_pbar"]))
    stage("pretrain", workspace.run("pretrain", *workspace.train_command(
        UNLABELED_ID, "all", PRETRAINER, PRETRAIN_PLANS, budget.pretrain_epochs, budget.pretrain_iterations)))
    checkpoint = (workspace.folder("nnUNet_results") / UNLABELED_DATASET
                  / f"{PRETRAINER}__{PRETRAIN_PLANS}__3d_fullres" / "fold_all" / "checkpoint_final.pth")
    stage("prepare", workspace.run("prepare_finetune", [
        "nnssl_prepare_finetune", "-d", LABELED_ID, "-c", checkpoint, "-np", 1, "-npfp", 1]))
    write_split(workspace, budget)
    for name, fine_tuner in (("pretrained", trainer), ("scratch", scratch)):
        stage(name, workspace.run(f"finetune_{name}", *workspace.train_command(
            LABELED_ID, "0", fine_tuner, FINETUNE_PLANS, budget.finetune_epochs, budget.finetune_iterations)))
    return SeedResult(seed, validation_dice(workspace, trainer), validation_dice(workspace, scratch), seconds)


def report(results: Sequence[SeedResult], trainer: str, scratch: str, quick: bool, wall_seconds: float) -> None:
    """Per-seed table, median [min..max] over seeds, the wall time, and the headline ratio line (last)."""
    print_table(f"Held-out Dice (foreground_mean, nnU-Net validation of fold 0): {trainer} vs {scratch}",
                ["seed", "Dice pretrained", "Dice scratch", "difference", "ratio"],
                [[r.seed, f"{r.dice_pretrained:.4f}", f"{r.dice_scratch:.4f}",
                  f"{r.dice_pretrained - r.dice_scratch:+.4f}", f"{r.ratio:.3f}"] for r in results])
    ratios = [r.ratio for r in results if not math.isnan(r.ratio)]
    rows = [["Dice pretrained", summarize([r.dice_pretrained for r in results]).format()],
            ["Dice scratch", summarize([r.dice_scratch for r in results]).format()],
            ["difference", summarize([r.dice_pretrained - r.dice_scratch for r in results]).format()],
            ["ratio", summarize(ratios).format() if ratios else "undefined (scratch Dice 0 for every seed)"]]
    stages = list(results[0].seconds)
    rows += [[f"{name} s", summarize([r.seconds[name] for r in results]).format()] for name in stages]
    print_table(f"Over {len(results)} seed(s): median [min..max]", ["quantity", "value"], rows)
    if max(max(r.dice_pretrained, r.dice_scratch) for r in results) < LEARNED_DICE:
        print(f"Every Dice is below {LEARNED_DICE}: the fine-tuning budget is too small to learn the task, so the "
              f"ratio is noise.")
    if len(ratios) < len(results):
        print(f"{len(results) - len(ratios)} seed(s) left out of the ratio: the scratch twin's Dice was 0.")
    print("Seeds drive the data generator only; nnU-Net's training is not seeded, so the spread includes "
          "run-to-run noise.")
    if quick:
        print("--quick: tiny budgets, a smoke check of the pipeline, NOT evidence for or against transfer.")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"wall time {wall_seconds:.0f} s (CPU time of the commands {usage.ru_utime + usage.ru_stime:.0f} s; "
          f"on a shared machine other processes' load adds to the wall time)")
    print_ratio_lines({"dice_pretrained_over_scratch": ratios or [math.nan]})


BUDGET_OPTIONS = {
    "num_unlabeled": "unlabeled volumes for the pretraining",
    "num_labeled": "labeled cases the fine-tuning trains on",
    "num_heldout": "further labeled cases the Dice is measured on",
    "pretrain_epochs": "S3D pretraining epochs",
    "pretrain_iterations": "S3D pretraining iterations per epoch",
    "finetune_epochs": "fine-tuning epochs (both trainers)",
    "finetune_iterations": "fine-tuning iterations per epoch (both trainers)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets and one seed: a smoke check under two minutes on 2 CPU cores")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"data seeds, one probe each; repeat a seed to see the "
                        f"run-to-run noise (default {list(FULL.seeds)}, quick {list(QUICK.seeds)})")
    for field, description in BUDGET_OPTIONS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field,
                            help=f"{description} (default {getattr(FULL, field)}, quick {getattr(QUICK, field)})")
    parser.add_argument("--trainer", default="nnsslFinetuneTrainer", help="fine-tuning trainer; the scratch twin is "
                        f"<trainer>_scratch if it exists, else {DEFAULT_SCRATCH} (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="nnUNetv2_train -device (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs, results)")
    return parser


def budget_from(args: argparse.Namespace) -> Budget:
    """The quick or full budget with the options given on the command line."""
    budget = QUICK if args.quick else FULL
    overrides = {field: getattr(args, field) for field in BUDGET_OPTIONS if getattr(args, field) is not None}
    budget = replace(budget, **overrides, **({"seeds": tuple(args.seeds)} if args.seeds else {}))
    for field in BUDGET_OPTIONS:
        if getattr(budget, field) < 1:
            raise SystemExit(f"transfer_probe: --{field.replace('_', '-')} must be at least 1")
    return budget


def main() -> int:
    args = build_parser().parse_args()
    budget = budget_from(args)
    start = time.perf_counter()
    scratch = scratch_twin(args.trainer)
    print(f"transfer probe{' (--quick: smoke check, not evidence)' if args.quick else ''}: {budget.num_unlabeled} "
          f"unlabeled volumes, {PRETRAINER} {budget.pretrain_epochs} x {budget.pretrain_iterations} iterations; "
          f"{args.trainer} vs {scratch}, {budget.finetune_epochs} x {budget.finetune_iterations} iterations each on "
          f"{budget.num_labeled} labeled cases, Dice on {budget.num_heldout} held-out case(s); seeds "
          f"{list(budget.seeds)}; device {args.device}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="nnssl_transfer_probe_"))
    keep = args.keep
    try:
        results = [probe_seed(root / f"run{index}_seed{seed}", seed, budget, args.trainer, scratch, args.device)
                   for index, seed in enumerate(budget.seeds)]
    except ProbeFailure as failure:
        keep = True
        print(f"transfer_probe: {failure}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(results, args.trainer, scratch, args.quick, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
