"""Training throughput (samples/s) of S3D pretraining with 1 vs N DDP processes, the plans' batch split over them.

Why: ``nnssl_train`` under torchrun splits the plans' batch over the ranks and averages gradients every step; this says
what a second process (CPU, gloo) or GPU (NCCL) buys for the same global batch, including the all-reduce.

Every process runs what a rank of ``nnssl_train`` runs per iteration: the S3D trainer's own ``train_step`` (mask
sampling, sparse forward, masked loss, backward with DDP's gradient all-reduce, clipping, SGD step), on the network
the trainer builds from the preset's plans (``step_cost.prepare``), wrapped in ``DistributedDataParallel`` as nnU-Net
wraps it; threads per process follow ``nnssl_train`` (``nnssl.integration.distributed.configure_threads``: the node's cores shared
by its processes on the CPU, one per process on a GPU). A synthetic batch replaces the data loader, so the figure is
the step's scaling, not the augmentation pipeline's (``data_pipeline.py`` measures that; its workers scale per rank).
Samples/s = global batch x timed steps / wall time of the slowest rank. Cases are interleaved round by round; each
case starts its processes afresh (start-up is not timed).

Usage: ``python benchmarks/ddp_scaling.py --quick`` (tiny preset, 64^3, global batch 2, 1 vs 2 CPU processes) or
``python benchmarks/ddp_scaling.py --device cuda --world-sizes 1 2 4 --preset resenc_l --batch 8`` on a machine with
that many GPUs. Needs the installed package (``pip install --no-deps .``).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from _common import base_parser, per_round_ratios, print_ratio_lines, print_table, run_interleaved, summarize
from nnssl.integration.distributed import backend_for, configure_threads, per_rank_batch_size
from nnssl.methods.masking import BlockMaskSampler
from nnssl.presets import ResEncPreset
from step_cost import PRESETS, Settings, prepare

RESENC_PRESETS = {name: preset for name, preset in PRESETS.items() if isinstance(preset, ResEncPreset)}  # S3D steps


@dataclass(frozen=True)
class Case:
    preset: str
    global_batch: int
    device_type: str
    steps: int
    warmup: int
    seed: int


def _rank_main(rank: int, world_size: int, case: Case, rendezvous: str, results: multiprocessing.Queue) -> None:
    """One DDP rank: warm-up steps, then timed steps between barriers; rank 0 reports the wall time."""
    device = torch.device("cuda", rank) if case.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_threads(device.type, world_size)
    dist.init_process_group(backend_for(device), init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        batch = per_rank_batch_size(case.global_batch, world_size)
        # bf16 on CUDA, fp32 on the CPU: the pretraining trainers' precision
        host, step = prepare("s3d", Settings(PRESETS[case.preset], batch, device, bf16=device.type == "cuda",
                                             seed=case.seed))
        host.mask_sampler = BlockMaskSampler(host.configuration_manager.patch_size, host.masking, seed=case.seed,
                                             rank=rank)
        host.network = DistributedDataParallel(host.network)
        for _ in range(case.warmup):
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(case.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        if rank == 0:
            results.put(time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def samples_per_second(case: Case, world_size: int) -> float:
    """Start ``world_size`` fresh processes for one measurement."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = str(Path(folder) / "rendezvous")
        processes = [context.Process(target=_rank_main, args=(rank, world_size, case, rendezvous, results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"A rank of the {world_size}-process case failed (exit codes {failed}).")
        seconds = results.get(timeout=10)
    return case.global_batch * case.steps / seconds


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(RESENC_PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's plans batch; "
                                                                "2 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="process counts; the first is "
                                                                                  "the baseline")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    args = parser.parse_args()
    if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"--world-sizes {args.world_sizes} needs {max(args.world_sizes)} GPUs; "
                         f"{torch.cuda.device_count()} visible.")
    case = Case(preset=args.preset, global_batch=args.batch or (2 if args.quick else PRESETS[args.preset].batch_size),
                device_type=args.device, steps=args.steps or (3 if args.quick else 10), warmup=1 if args.quick else 2,
                seed=args.seed)
    for world_size in args.world_sizes:
        per_rank_batch_size(case.global_batch, world_size)  # fail before measuring anything
    rounds = args.repeats or (3 if args.quick else 5)
    cases = {f"{w} process{'es' if w > 1 else ''}": (lambda w=w: samples_per_second(case, w))
             for w in args.world_sizes}
    results = run_interleaved(cases, rounds)

    baseline_name = next(iter(cases))
    rows = []
    for (name, values), world_size in zip(results.items(), args.world_sizes):
        rows.append([name, per_rank_batch_size(case.global_batch, world_size), summarize(values).format(),
                     summarize(per_round_ratios(values, results[baseline_name])).format()])
    print_table(f"S3D training throughput, preset {case.preset}, global batch {case.global_batch}, {case.device_type} "
                f"({rounds} rounds x {case.steps} steps; median [min..max])",
                ["case", "batch per process", "samples/s", f"vs {baseline_name}"], rows)
    print_ratio_lines({f"ddp_{w}_vs_{args.world_sizes[0]}_processes": per_round_ratios(results[name],
                                                                                       results[baseline_name])
                       for name, w in zip(results, args.world_sizes) if name != baseline_name})


if __name__ == "__main__":
    main()
