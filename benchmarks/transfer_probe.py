"""Transfer probe: does pretraining beat nnU-Net's own recipe when only a handful of cases are labeled?

Everything runs through the user's commands (console scripts in subprocesses with their own nnU-Net folders):

1. per seed, ``nnssl_demo_data --seed SEED``: unlabeled synthetic heads and a labeled Dataset502 whose target, the
   lateral ventricles, comes from the same synthetic anatomy and is not found by any intensity threshold (the best
   single-threshold Dice of the held-out cases is printed as a sanity line);
2. ``nnssl_ingest`` -> Dataset501, ``nnUNetv2_plan_and_preprocess -pl PLANNER`` (``nnsslPlannerMini`` on the CPU:
   the tiny network at 1.5 mm with a 48^3 patch, a third of the tiny preset's step cost), then each pretraining
   trainer once per seed (``nnssl_seed=SEED``); its ``checkpoint_final.pth`` is cached under ``--cache`` and reused
   by later probe runs with the same data, pretraining budget and seed;
3. ``nnssl_prepare_finetune -d 502`` and a ``splits_final.json`` whose fold k trains on the first n_k labeled cases
   (``--labeled``, e.g. 1 2 4) and validates on the same held-out cases;
4. every arm for every budget, labeled count and seed: ``nnUNetv2_train 502 3d_fullres FOLD -tr ARM -p
   nnsslFinetunePlans`` with ``nnssl_seed=SEED`` (paired: same seed, same data, same sampling streams); an arm
   ``TRAINER@PRETRAINER`` fine-tunes the checkpoint of that pretraining trainer, plain names that load weights use
   the first pretrainer's; arms that load nothing (``nnsslTrainer`` = nnU-Net's recipe on the same plans, the
   ``_scratch`` twins) train from random initialisation;
5. Dice = ``foreground_mean.Dice`` of nnU-Net's validation of the final weights on the held-out cases (without
   test-time mirroring, ``nnssl_val_disable_tta=1``, the same for every arm).

Reported: mean +- sd over seeds per arm, budget and labeled count; the paired difference of every pretrained arm
minus the strong baseline (``--baseline``, default nnU-Net's recipe) with its sign count over seeds; ``ratio``
lines; a PNG of Dice against budget (one panel per labeled count) and a JSON of every run.

Modes: ``--quick`` (a smoke check of the pipeline, minutes, NOT evidence), ``--cpu`` (3 seeds, 1/2/4 labeled cases,
two budgets; 40 minutes measured on 2 CPU cores with two trainings at a time, above the 30-minute target), ``--gpu``
(sized for one GPU). Every size can be overridden. ``--jobs`` trainings run at the same time (default 2 on the CPU,
each with one torch thread; 1 on a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from _common import print_ratio_lines, print_table

UNLABELED_ID, LABELED_ID = 501, 502
UNLABELED_DATASET, LABELED_DATASET = "Dataset501_DemoUnlabeled", "Dataset502_nnsslDemoLabeled"
FINETUNE_PLANS = "nnsslFinetunePlans"
PLANNERS = {"nnsslPlannerMini": "nnsslPlansMini", "nnsslPlannerTiny": "nnsslPlansTiny"}
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
VAL_ITERATIONS = 1  # the per-epoch validation loss is only logged; the Dice comes from nnU-Net's final validation
DEFAULT_ARMS = ("nnsslFinetuneTrainer", "nnsslFinetuneTrainer_scratch", "nnsslTrainer")
DEFAULT_BASELINE = "nnsslTrainer"


@dataclass(frozen=True)
class Budget:
    """Seeds, data sizes and training lengths of one probe run (a fine-tuning budget is epochs x iterations)."""

    seeds: tuple[int, ...]
    num_unlabeled: int
    labeled: tuple[int, ...]
    num_heldout: int
    pretrain_epochs: int
    pretrain_iterations: int
    finetune: tuple[tuple[int, int], ...]
    planner: str


QUICK = Budget(seeds=(0,), num_unlabeled=2, labeled=(1,), num_heldout=1, pretrain_epochs=1, pretrain_iterations=2,
               finetune=((2, 3),), planner="nnsslPlannerMini")
CPU = Budget(seeds=(0, 1, 2), num_unlabeled=8, labeled=(1, 2, 4), num_heldout=2, pretrain_epochs=8,
             pretrain_iterations=40, finetune=((5, 20), (10, 20)), planner="nnsslPlannerMini")
GPU = Budget(seeds=(0, 1, 2), num_unlabeled=64, labeled=(1, 2, 4, 8), num_heldout=8, pretrain_epochs=100,
             pretrain_iterations=250, finetune=((50, 50), (200, 50)), planner="nnsslPlannerTiny")


@dataclass(frozen=True)
class Arm:
    """A fine-tuning trainer and the pretraining trainer whose checkpoint it starts from (None: random init)."""

    trainer: str
    pretrainer: str | None

    @property
    def name(self) -> str:
        return f"{self.trainer}@{self.pretrainer}" if self.pretrainer else self.trainer


@dataclass(frozen=True)
class Run:
    """One fine-tuning run and its held-out Dice."""

    arm: str
    seed: int
    labeled: int
    budget: str
    iterations: int
    dice: float
    seconds: float


class ProbeFailure(RuntimeError):
    """A command of the probe failed; the message names its log."""


def console_script(name: str) -> str:
    """Absolute path of an installed console script next to the running interpreter (else the bare name)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


class Workspace:
    """One seed's nnU-Net folders and the environment its commands run in; logs every command to ``logs/``."""

    def __init__(self, root: Path, device: str, seed: int, torch_threads: int | None) -> None:
        self.root, self.device, self.seed = root, device, seed
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # the user's own nnssl_* variables (schedule, batch size, checkpoint override) must not reach the commands
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("nnssl_")}
        # validation without test-time mirroring: 8x cheaper, the same for every arm
        self.env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnssl_seed=str(seed), nnssl_val_disable_tta="1")
        if torch_threads is not None:
            self.env["nnssl_torch_threads"] = str(torch_threads)
        for variable in NNUNET_FOLDERS:
            (root / variable).mkdir(exist_ok=True)
            self.env[variable] = str(root / variable)

    def folder(self, variable: str) -> Path:
        return Path(self.env[variable])

    def run(self, step: str, args: Sequence[object], extra_env: Mapping[str, str] | None = None) -> float:
        """Run a console script, its output going to ``logs/<step>.log``; return wall seconds."""
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

    def train(self, step: str, dataset_id: int, fold: str, trainer: str, plans: str, epochs: int, iterations: int,
              extra_env: Mapping[str, str] | None = None) -> float:
        """``nnUNetv2_train`` with the nnssl smoke-run variables setting ``epochs`` x ``iterations``."""
        budget = {"nnssl_num_epochs": str(epochs), "nnssl_iterations_per_epoch": str(iterations),
                  "nnssl_val_iterations_per_epoch": str(VAL_ITERATIONS)}
        return self.run(step, ["nnUNetv2_train", dataset_id, "3d_fullres", fold, "-tr", trainer, "-p", plans,
                               "-device", self.device], {**budget, **(extra_env or {})})


def in_work_folder(name: str, keep: bool, body: Callable[[Path], None]) -> bool:
    """``body(root)`` in a fresh temporary folder, removed afterwards unless ``keep`` or a command failed (its log is
    there). A failure is printed and gives False."""
    root = Path(tempfile.mkdtemp(prefix=f"nnssl_{name}_"))
    try:
        body(root)
        return True
    except ProbeFailure as failure:
        keep = True
        print(f"{name}: {failure}", file=sys.stderr)
        return False
    finally:
        if keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def parse_arms(names: Sequence[str], pretrainers: Sequence[str]) -> list[Arm]:
    """``TRAINER[@PRETRAINER]`` -> arms; a trainer that loads weights defaults to the first pretrainer."""
    from nnssl.integration.registry import find_class

    arms = []
    for name in names:
        trainer, _, pretrainer = name.partition("@")
        cls = find_class(trainer)
        if cls is None:
            raise SystemExit(f"transfer_probe: no nnssl trainer called {trainer!r}")
        recipe = getattr(cls, "recipe", None)
        loads = recipe is not None and recipe.loads_pretrained
        if pretrainer and not loads:
            raise SystemExit(f"transfer_probe: {trainer} trains from random initialisation; drop '@{pretrainer}'")
        if pretrainer and find_class(pretrainer) is None:
            raise SystemExit(f"transfer_probe: no nnssl pretraining trainer called {pretrainer!r}")
        arms.append(Arm(trainer, (pretrainer or pretrainers[0]) if loads else None))
    return arms


def budget_name(epochs: int, iterations: int) -> str:
    return f"{epochs}x{iterations}"


def write_split(workspace: Workspace, budget: Budget) -> None:
    """The first ``num_heldout`` cases are held out; fold k trains on the ``labeled[k]`` cases after them.

    So a case set depends on its size only, and runs with the same seed, size and arm are identical across probes.
    """
    cases = [f"demo_{index:03d}" for index in range(budget.num_heldout + max(budget.labeled))]
    heldout, pool = cases[:budget.num_heldout], cases[budget.num_heldout:]
    split = [{"train": pool[:n], "val": heldout} for n in budget.labeled]
    path = workspace.folder("nnUNet_preprocessed") / LABELED_DATASET / "splits_final.json"
    path.write_text(json.dumps(split, indent=2) + "\n")


def heldout_threshold_dice(workspace: Workspace, budget: Budget) -> float:
    """Mean over the held-out cases of the best Dice a single intensity threshold reaches (sanity: should be low)."""
    import SimpleITK as sitk

    from nnssl.demo.threshold_dice import best_threshold_dice

    raw = workspace.folder("nnUNet_raw") / LABELED_DATASET
    scores = []
    for index in range(budget.num_heldout):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"demo_{index:03d}_0000.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"demo_{index:03d}.nii.gz")))
        scores.append(best_threshold_dice(image, label))
    return statistics.fmean(scores)


def validation_dice(results: Path, trainer: str, fold: int) -> float:
    summary = (results / LABELED_DATASET / f"{trainer}__{FINETUNE_PLANS}__3d_fullres" / f"fold_{fold}" / "validation"
               / "summary.json")
    return float(json.loads(summary.read_text())["foreground_mean"]["Dice"])


def unlabeled_data_hash(workspace: Workspace) -> str:
    """Hash of the generated unlabeled files: a cached checkpoint is reused only for identical pretraining data."""
    digest = hashlib.sha256()
    for folder in ("unlabeled", "unlabeled_masks"):
        for path in sorted((workspace.root / "source" / folder).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(workspace.root)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def pretrained_checkpoint(workspace: Workspace, budget: Budget, pretrainer: str, cache: Path) -> Path:
    """The pretrainer's final checkpoint for this seed: from the cache, or trained now and cached."""
    key = (f"{pretrainer}_{budget.planner}_seed{workspace.seed}_data{unlabeled_data_hash(workspace)}_"
           f"{budget_name(budget.pretrain_epochs, budget.pretrain_iterations)}.pth")
    cached = cache / key
    if cached.is_file():
        print(f"  seed {workspace.seed}: {pretrainer} checkpoint from the cache ({cached})", flush=True)
        return cached
    plans = PLANNERS[budget.planner]
    name = budget_name(budget.pretrain_epochs, budget.pretrain_iterations)
    results = workspace.root / f"results_pretrain_{name}"  # one folder per length: lengths can train at once
    seconds = workspace.train(f"pretrain_{pretrainer}_{name}", UNLABELED_ID, "all", pretrainer, plans,
                              budget.pretrain_epochs, budget.pretrain_iterations, {"nnUNet_results": str(results)})
    print(f"  seed {workspace.seed}: {pretrainer} pretraining {name} {seconds:.0f} s", flush=True)
    trained = results / UNLABELED_DATASET / f"{pretrainer}__{plans}__3d_fullres" / "fold_all" / "checkpoint_final.pth"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, cached)
    return cached


def generate_and_plan(workspace: Workspace, budget: Budget) -> None:
    """This seed's demo data: the unlabeled volumes ingested and planned, the labeled dataset written."""
    source = workspace.root / "source"
    workspace.run("demo_data", ["nnssl_demo_data", "-o", source, "--num_unlabeled", budget.num_unlabeled,
                                "--num_labeled", max(budget.labeled) + budget.num_heldout,
                                "--seed", workspace.seed, "-d", LABELED_ID])
    workspace.run("ingest", ["nnssl_ingest", "-i", source / "unlabeled", "--anatomy_masks",
                             source / "unlabeled_masks" / "anatomy", "-d", UNLABELED_ID, "-n", "DemoUnlabeled",
                             "-np", 1])
    workspace.run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", UNLABELED_ID, "-pl",
                                          budget.planner, "-c", "3d_fullres", "-np", 1, "-npfp", 1, "--no_pbar"])


def prepare_labeled(workspace: Workspace, budget: Budget, checkpoint: Path) -> None:
    """The labeled dataset planned for ``checkpoint`` (``nnsslFinetunePlans``) and its held-out split."""
    workspace.run("prepare_finetune", ["nnssl_prepare_finetune", "-d", LABELED_ID, "-c", checkpoint, "-np", 1,
                                       "-npfp", 1])
    write_split(workspace, budget)


def prepare_seed(workspace: Workspace, budget: Budget, pretrainers: Sequence[str], cache: Path) -> dict[str, Path]:
    """Data, pretraining (cached) and the fine-tuning plans of one seed; returns {pretrainer: checkpoint}."""
    generate_and_plan(workspace, budget)
    checkpoints = {p: pretrained_checkpoint(workspace, budget, p, cache) for p in pretrainers}
    prepare_labeled(workspace, budget, checkpoints[pretrainers[0]])
    return checkpoints


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning training of the probe: a seed's workspace, a budget, an arm and a labeled count (= fold)."""

    workspace: Workspace
    epochs: int
    iterations: int
    arm: Arm
    fold: int
    labeled: int


def finetune_jobs(workspace: Workspace, budget: Budget, arms: Sequence[Arm]) -> list[FinetuneJob]:
    """Every (budget, arm, labeled count) of this seed."""
    return [FinetuneJob(workspace, epochs, iterations, arm, fold, labeled) for epochs, iterations in budget.finetune
            for arm in arms for fold, labeled in enumerate(budget.labeled)]


def run_finetune(job: FinetuneJob, checkpoints: Mapping[str, Path]) -> Run:
    """Train one job through ``nnUNetv2_train`` and read its held-out Dice."""
    name = budget_name(job.epochs, job.iterations)
    results = job.workspace.root / f"results_{name}"
    extra = {"nnUNet_results": str(results)}
    if job.arm.pretrainer:
        extra["nnssl_pretrained_checkpoint"] = str(checkpoints[job.arm.pretrainer])
    step = f"finetune_{job.arm.name.replace('@', '_at_')}_{name}_n{job.labeled}"
    seconds = job.workspace.train(step, LABELED_ID, str(job.fold), job.arm.trainer, FINETUNE_PLANS, job.epochs,
                                  job.iterations, extra)
    return Run(job.arm.name, job.workspace.seed, job.labeled, name, job.epochs * job.iterations,
               validation_dice(results, job.arm.trainer, job.fold), seconds)


def run_all(workspaces: Sequence[Workspace], budget: Budget, arms: Sequence[Arm], pretrainers: Sequence[str],
            cache: Path, jobs: int) -> tuple[list[Run], list[float]]:
    """Every seed's preparation and fine-tuning runs, at most ``jobs`` commands at a time.

    One pool runs the seeds' preparations (data, pretraining, planning) and, as soon as a seed is prepared, its
    fine-tuning runs, so no slot waits for another seed's pretraining. Returns the runs and the threshold Dice per
    seed (in seed order).
    """
    runs: list[Run] = []
    threshold: dict[int, float] = {}
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        pending = {pool.submit(prepare_seed, w, budget, pretrainers, cache): w for w in workspaces}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                workspace = pending.pop(future)
                result = future.result()  # a ProbeFailure propagates; the pool lets running commands finish
                if isinstance(result, Run):
                    print(f"  seed {result.seed}: {result.arm:<40} n={result.labeled} {result.budget:>6}  Dice "
                          f"{result.dice:.3f} ({result.seconds:.0f} s)", flush=True)
                    runs.append(result)
                    continue
                threshold[workspace.seed] = heldout_threshold_dice(workspace, budget)
                for job in finetune_jobs(workspace, budget, arms):
                    pending[pool.submit(run_finetune, job, result)] = workspace
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: finish the running commands, start no more
    return runs, [threshold[w.seed] for w in workspaces]


def mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {sd:.3f}"


def report(runs: Sequence[Run], arms: Sequence[Arm], baseline: str, budget: Budget) -> dict[str, list[float]]:
    """Tables of mean +- sd Dice and of paired differences against ``baseline``; returns the ratio lines' values."""
    budgets = [budget_name(*b) for b in budget.finetune]
    by_key = {(r.arm, r.labeled, r.budget, r.seed): r.dice for r in runs}
    rows = [[arm.name, labeled, name, mean_sd([by_key[(arm.name, labeled, name, s)] for s in budget.seeds])]
            for name in budgets for labeled in budget.labeled for arm in arms]
    print_table(f"Held-out Dice (foreground_mean), mean +- sd over seeds {list(budget.seeds)}",
                ["arm", "labeled", "budget", "Dice"], rows)
    ratios: dict[str, list[float]] = {}
    differences = []
    for arm in arms:
        if arm.name == baseline or arm.pretrainer is None:
            continue
        all_pairs = []
        for name in budgets:
            for labeled in budget.labeled:
                pairs = [(by_key[(arm.name, labeled, name, s)], by_key[(baseline, labeled, name, s)])
                         for s in budget.seeds]
                deltas = [a - b for a, b in pairs]
                wins = sum(d > 0 for d in deltas)
                differences.append([arm.name, labeled, name, mean_sd(deltas), f"{wins}/{len(deltas)}"])
                all_pairs += pairs
        mean_arm = statistics.fmean(a for a, _ in all_pairs)
        mean_base = statistics.fmean(b for _, b in all_pairs)
        ratios[f"dice_{arm.name}_over_{baseline}"] = [mean_arm / mean_base if mean_base > 0 else float("nan")]
    if differences:
        print_table(f"Paired difference pretrained - {baseline} (Dice; seeds where pretrained wins)",
                    ["arm", "labeled", "budget", "difference", "wins"], differences)
    return ratios


def plot(runs: Sequence[Run], arms: Sequence[Arm], budget: Budget, path: Path) -> None:
    """Dice against fine-tuning iterations, one panel per labeled count: per arm the mean over seeds (line) and
    every seed's run (dots, nudged sideways per arm so they do not hide each other; an sd bar would hide that a
    mean of 0.6 can be two good seeds and one that never segments)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(budget.labeled), figsize=(4.5 * len(budget.labeled), 4), squeeze=False)
    iterations = [epochs * its for epochs, its in budget.finetune]
    nudge = 0.015 * (max(iterations) - min(iterations) or max(iterations))
    for axis, labeled in zip(axes[0], budget.labeled):
        for index, arm in enumerate(arms):
            offset = (index - (len(arms) - 1) / 2) * nudge
            means = []
            for (epochs, its), x in zip(budget.finetune, iterations):
                dice = [r.dice for r in runs if r.arm == arm.name and r.labeled == labeled
                        and r.budget == budget_name(epochs, its)]
                means.append(statistics.fmean(dice))
                axis.scatter([x + offset] * len(dice), dice, s=14, alpha=0.45, color=f"C{index}")
            axis.plot([x + offset for x in iterations], means, marker="o", color=f"C{index}", label=arm.name)
        axis.set_title(f"{labeled} labeled case{'s' if labeled > 1 else ''} (line: mean, dots: seeds)")
        axis.set_xlabel("fine-tuning iterations")
        axis.set_ylabel("held-out Dice")
        axis.set_ylim(-0.02, 1)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke check of the pipeline in minutes (not evidence)")
    mode.add_argument("--cpu", action="store_true", help="3 seeds, 1/2/4 labeled cases, 2 budgets (default mode)")
    mode.add_argument("--gpu", action="store_true", help="sizes for one GPU (use with --device cuda)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (data and training), one probe each")
    parser.add_argument("--labeled", type=int, nargs="+", help="numbers of labeled training cases")
    parser.add_argument("--num-heldout", type=int, help="held-out labeled cases the Dice is measured on")
    parser.add_argument("--num-unlabeled", type=int, help="unlabeled volumes for the pretraining")
    parser.add_argument("--planner", choices=sorted(PLANNERS), help="preset of the pretraining (and so fine-tuning) "
                        "plans (default: nnsslPlannerMini, --gpu nnsslPlannerTiny)")
    parser.add_argument("--pretrain", metavar="EPOCHSxITERATIONS", help="pretraining budget, e.g. 10x40")
    parser.add_argument("--finetune", nargs="+", metavar="EPOCHSxITERATIONS", help="fine-tuning budgets, e.g. 5x12")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help="fine-tuning arms TRAINER[@PRETRAINER] (default %(default)s)")
    parser.add_argument("--pretrainers", nargs="+", default=["S3DPretrainTrainer"],
                        help="pretraining trainers run once per seed; the first is the default (default %(default)s)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="the arm differences are taken against")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--torch-threads", type=int,
                        help="intra-op threads of every training (nnssl_torch_threads; default: 1 when several "
                             "CPU trainings run at once, else nnU-Net's one per core). Use 1 on a machine shared "
                             "with other jobs: there, one thread per core made steps 8-25x slower")
    parser.add_argument("--jobs", type=int,
                        help="trainings run at the same time (default: 2 on the CPU, each with one torch thread, "
                             "1 on a GPU). Two 1-thread runs on 2 cores finish more work than one 2-thread run")
    parser.add_argument("--cache", type=Path, help="folder for pretrained checkpoints (default: in the work folder)")
    parser.add_argument("--output", type=Path, default=Path("transfer_probe"),
                        help="folder for transfer_probe.json and transfer_probe.png (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs, results)")
    return parser


def parse_budget(text: str) -> tuple[int, int]:
    """``'5x12'`` -> (5, 12)."""
    try:
        epochs, iterations = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"transfer_probe: a budget is EPOCHSxITERATIONS such as 5x12, not {text!r}") from None
    return epochs, iterations


def budget_from(args: argparse.Namespace) -> Budget:
    budget = QUICK if args.quick else GPU if args.gpu else CPU
    overrides = {}
    for field, value in (("seeds", args.seeds), ("labeled", args.labeled)):
        if value:
            overrides[field] = tuple(value)
    for field in ("num_heldout", "num_unlabeled", "planner"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.pretrain:
        overrides["pretrain_epochs"], overrides["pretrain_iterations"] = parse_budget(args.pretrain)
    if args.finetune:
        overrides["finetune"] = tuple(parse_budget(b) for b in args.finetune)
    budget = replace(budget, **overrides)
    numbers = list(budget.labeled) + [budget.num_heldout, budget.num_unlabeled, budget.pretrain_epochs,
                                      budget.pretrain_iterations] + [n for b in budget.finetune for n in b]
    if min(numbers) < 1:
        raise SystemExit("transfer_probe: every count and budget must be at least 1")
    return budget


def parallelism(args: argparse.Namespace) -> tuple[int, int | None]:
    """(trainings at a time, torch threads per training or None for nnU-Net's default) from ``--jobs`` and
    ``--torch-threads``: 2 one-thread trainings on the CPU, 1 on a GPU, unless given."""
    for option, value in (("--jobs", args.jobs), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise SystemExit(f"transfer_probe: {option} must be at least 1, not {value}")
    jobs = args.jobs if args.jobs is not None else 2 if args.device == "cpu" else 1
    if args.torch_threads is not None:
        return jobs, args.torch_threads
    # parallel CPU trainings with nnU-Net's one thread per core oversubscribe the cores (8-25x slower steps measured)
    return jobs, 1 if jobs > 1 and args.device == "cpu" else None


def main() -> int:
    args = build_parser().parse_args()
    budget = budget_from(args)
    arms = parse_arms(args.arms, args.pretrainers)
    if args.baseline not in [arm.name for arm in arms]:
        raise SystemExit(f"transfer_probe: the baseline {args.baseline!r} is not one of the arms")
    jobs, torch_threads = parallelism(args)
    start = time.perf_counter()
    print(f"transfer probe{' (--quick: smoke check, NOT evidence)' if args.quick else ''}: seeds {list(budget.seeds)},"
          f" {budget.num_unlabeled} unlabeled volumes, pretraining {args.pretrainers} "
          f"{budget_name(budget.pretrain_epochs, budget.pretrain_iterations)}; arms {[a.name for a in arms]}; "
          f"{list(budget.labeled)} labeled case(s), Dice on {budget.num_heldout} held-out; fine-tuning budgets "
          f"{[budget_name(*b) for b in budget.finetune]}; device {args.device}, {jobs} training(s) at a time, torch "
          f"threads {torch_threads or 'nnU-Net default'}", flush=True)
    runs: list[Run] = []
    threshold: list[float] = []

    def probe(root: Path) -> None:
        nonlocal runs, threshold
        workspaces = [Workspace(root / f"seed{seed}", args.device, seed, torch_threads) for seed in budget.seeds]
        runs, threshold = run_all(workspaces, budget, arms, args.pretrainers, args.cache or root / "pretrained", jobs)

    if not in_work_folder("transfer_probe", args.keep, probe):
        return 1
    print(f"\nsanity: the best single intensity threshold reaches Dice {statistics.fmean(threshold):.3f} on the "
          f"held-out cases (mean over seeds)")
    ratios = report(runs, arms, args.baseline, budget)
    args.output.mkdir(parents=True, exist_ok=True)
    plot(runs, arms, budget, args.output / "transfer_probe.png")
    (args.output / "transfer_probe.json").write_text(json.dumps({
        "budget": asdict(budget), "arms": [a.name for a in arms], "baseline": args.baseline,
        "threshold_dice": threshold, "runs": [asdict(r) for r in runs],
        "wall_seconds": time.perf_counter() - start}, indent=2) + "\n")
    print(f"\nwrote {args.output / 'transfer_probe.png'} and {args.output / 'transfer_probe.json'}; wall time "
          f"{time.perf_counter() - start:.0f} s")
    if args.quick:
        print("--quick: tiny budgets, a smoke check of the pipeline, NOT evidence for or against transfer.")
    print_ratio_lines(ratios or {"no_pretrained_arm": [float("nan")]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
