"""Does a pretraining method's pretext loss fall? Seeded short runs on generated heads, through the user's commands.

Per seed (one workspace each): ``nnssl_demo_data --seed SEED`` (unlabeled synthetic heads), ``nnssl_ingest``, and
``nnUNetv2_plan_and_preprocess`` with both tiny planners (``nnsslPlannerTiny``, ``nnsslPlannerPrimusTiny``). Then
every trainer (a name starting with "Primus" trains on the Primus plans, any other on the ResEnc plans) runs
``nnUNetv2_train`` for EPOCHS x ITERATIONS with ``nnssl_seed=SEED``; its per-epoch training and validation losses are
read from ``checkpoint_final.pth``.

Reported per trainer: the mean (+- sd over seeds) training loss of the first and of the last epoch, their ratio and
the number of seeds whose loss fell; the same for the validation loss (fixed-size held-out batches, noisier); and a
``ratio`` line per trainer pair given with ``--paired A B`` (last/first of A divided by that of B, per seed), for
comparing a variant with its base on the same data and seeds. A JSON file keeps every run.

Example (what documentation/pretraining.md reports; about 25 minutes on 2 CPU cores):
    python benchmarks/pretext_loss.py --trainers VoCoPretrainTrainer VoCoPretrainTrainer_momentum \
        --seeds 0 1 2 --epochs 15 --iterations 20 --paired VoCoPretrainTrainer_momentum VoCoPretrainTrainer \
        --json benchmarks/results/voco_teacher.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from _common import print_ratio_lines, print_table
from transfer_probe import Workspace

UNLABELED_ID, UNLABELED_DATASET = 511, "Dataset511_PretextUnlabeled"
PLANNERS = {"resenc": ("nnsslPlannerTiny", "nnsslPlansTiny"), "primus": ("nnsslPlannerPrimusTiny",
                                                                          "nnsslPlansPrimusTiny")}


def family(trainer: str) -> str:
    return "primus" if trainer.startswith("Primus") else "resenc"


def prepare(workspace: Workspace, num_unlabeled: int, batch_size: int | None) -> None:
    source = workspace.root / "source"
    workspace.run("demo_data", ["nnssl_demo_data", "-o", source, "--num_unlabeled", num_unlabeled, "--num_labeled",
                                0, "--num_test", 0, "--seed", workspace.seed])
    workspace.run("ingest", ["nnssl_ingest", "-i", source / "unlabeled", "-d", UNLABELED_ID, "-n", "PretextUnlabeled",
                             "-np", 1])
    planning = {} if batch_size is None else {"nnssl_batch_size": str(batch_size)}
    for planner, _ in PLANNERS.values():
        workspace.run(f"plan_{planner}", ["nnUNetv2_plan_and_preprocess", "-d", UNLABELED_ID, "-pl", planner, "-c",
                                          "3d_fullres", "-np", 1, "-npfp", 1, "--no_pbar"], planning)


def losses(workspace: Workspace, trainer: str, epochs: int, iterations: int) -> dict:
    plans = PLANNERS[family(trainer)][1]
    seconds = workspace.train(f"pretrain_{trainer}", UNLABELED_ID, "all", trainer, plans, epochs, iterations)
    checkpoint = torch.load(workspace.folder("nnUNet_results") / UNLABELED_DATASET / f"{trainer}__{plans}__3d_fullres"
                            / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    return {"trainer": trainer, "seed": workspace.seed, "seconds": seconds,
            "train": [float(v) for v in logging["train_losses"]], "val": [float(v) for v in logging["val_losses"]]}


def mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def report(runs: Sequence[dict], trainers: Sequence[str], paired: Sequence[Sequence[str]], window: int) -> None:
    rows = []
    for trainer in trainers:
        mine = [r for r in runs if r["trainer"] == trainer]
        for kind in ("train", "val"):
            first = [statistics.mean(r[kind][:window]) for r in mine]
            last = [statistics.mean(r[kind][-window:]) for r in mine]
            fell = sum(b < a for a, b in zip(first, last))
            rows.append([trainer, kind, mean_sd(first), mean_sd(last),
                         f"{statistics.mean(b / a for a, b in zip(first, last)):.3f}", f"{fell}/{len(mine)}",
                         f"{statistics.mean(r['seconds'] for r in mine):.0f} s"])
    print_table(f"Pretext loss, mean of the first and of the last {window} epoch(s) (mean +- sd over seeds)",
                ["trainer", "loss", "first epoch", "last epoch", "last/first", "fell (seeds)", "run time"], rows)
    ratios = {}
    for a, b in paired:
        per_seed = []
        for seed in sorted({r["seed"] for r in runs}):
            run_a = next(r for r in runs if r["trainer"] == a and r["seed"] == seed)
            run_b = next(r for r in runs if r["trainer"] == b and r["seed"] == seed)
            fall_a, fall_b = (statistics.mean(r["train"][-window:]) / statistics.mean(r["train"][:window])
                              for r in (run_a, run_b))
            per_seed.append(fall_a / fall_b)
        print(f"{a} / {b}, train loss last/first per seed: {' '.join(f'{r:.3f}' for r in per_seed)}")
        ratios[f"train_loss_fall_{a}_vs_{b}"] = per_seed
    if ratios:
        print_ratio_lines(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--num_unlabeled", type=int, default=16, help="generated heads per seed")
    parser.add_argument("--batch_size", type=int, help="plans' batch size (nnssl_batch_size at planning; default: "
                        "the presets' 2). A contrastive loss with a batch of 2 has one other sample as negative")
    parser.add_argument("--window", type=int, default=1, help="epochs averaged at the start and at the end (a "
                        "contrastive loss of a few small batches per epoch is noisy)")
    parser.add_argument("--from_json", type=Path, help="report the runs of an earlier --json file instead of training")
    parser.add_argument("--paired", nargs=2, action="append", default=[], metavar=("A", "B"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="workspace root (default: a temporary folder)")
    args = parser.parse_args()
    if args.from_json:
        report(json.loads(args.from_json.read_text())["runs"], args.trainers, args.paired, args.window)
        return 0
    root = args.work or Path(tempfile.mkdtemp(prefix="pretext_loss_"))
    runs = []
    for seed in args.seeds:
        workspace = Workspace(root / f"seed{seed}", "cpu", seed, torch_threads=None)
        prepare(workspace, args.num_unlabeled, args.batch_size)
        for trainer in args.trainers:
            runs.append(losses(workspace, trainer, args.epochs, args.iterations))
            print(f"seed {seed} {trainer}: train {runs[-1]['train'][0]:.4f} -> {runs[-1]['train'][-1]:.4f}",
                  flush=True)
    report(runs, args.trainers, args.paired, args.window)
    if args.json:
        args.json.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
