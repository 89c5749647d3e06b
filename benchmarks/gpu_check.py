"""One-shot GPU check: S3D step (eager / channels-last / compiled), data pipeline on all cores, 20 real iterations.

Why: pretraining time on a GPU is set by three rates that only a GPU host can measure together: the model step
(ResEnc-L, 160^3, batch 6, bf16) and its fraction of the device's bf16 peak, the patches/s that the host's CPU
workers deliver, and what ``nnUNetv2_train -tr S3DPretrainTrainer`` really achieves end to end (steps/s, GPU idle
fraction). One run, about 8 minutes on one GPU, one JSON file, ``ratio`` lines.

Sections (each timed in the same run):

1. ``step``: ``S3DPretrainTrainer``'s train step as ``step_cost.py`` runs it (the trainer's own ``train_step`` and
   ``compute_loss`` on a bare model) in each mode: eager, channels-last, ``torch.compile`` (and compile +
   channels-last with ``--all-modes``): ms/step, steps/s, peak memory, TFLOP/s and the fraction of the bf16 peak;
   plus the train step's device augmentation of a read-size batch and its host-to-device copy, timed apart.
2. ``pipeline``: the S3D and nnU-Net default loaders of ``data_pipeline.py`` in nnU-Net's multi-process augmenter
   with one worker per core (pinned memory on CUDA): patches/s delivered, and how that compares with what the
   fastest measured step consumes.
3. ``end_to_end``: generated 1 mm head-like volumes -> ``nnssl_ingest`` -> ``nnUNetv2_plan_and_preprocess -pl
   nnsslPlanner`` -> ``nnUNetv2_train -tr S3DPretrainTrainer`` for 2 epochs of 20 iterations with one worker per
   core; epoch 1 (after warm-up) gives steps/s and, from ``nvidia-smi`` samples in that epoch, the GPU idle fraction.

``--dry-run`` runs everything on the CPU at tiny sizes (tiny preset, compile skipped) to check the script itself.

Usage: ``python benchmarks/gpu_check.py [--out gpu_check.json]`` on a GPU host; ``python benchmarks/gpu_check.py
--dry-run`` anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from _common import peak_memory_bytes, print_ratio_lines, print_table, summarize, timed
from data_pipeline import (BASELINE, PIPELINES, loader_trainer, multiprocess_throughput, synthetic_case,
                           write_datasets)
from step_cost import Settings, count_flops, device_peak_tflops, prepare
from nnssl.device_augmentation import DeviceSpatialAugmentation, SpatialAugmentationConfig
from nnssl.presets import RESENC_L, RESENC_TINY

MODES = {"eager": (False, False), "channels_last": (False, True), "compile": (True, False),
         "compile_channels_last": (True, True)}
E2E_DATASET_ID = 990
E2E_ITERATIONS = 20


def _size(dry_run: bool) -> dict:
    """Problem sizes: the full recipe on a GPU, tiny ones for the dry run."""
    if dry_run:
        return {"preset": RESENC_TINY, "batch": 2, "repeats": 1, "warmup": 1, "volume": (48, 52, 44), "cases": 2,
                "pipeline_batches": 3, "planner": "nnsslPlannerTiny", "plans": "nnsslPlansTiny", "iterations": 2}
    return {"preset": RESENC_L, "batch": RESENC_L.batch_size, "repeats": 10, "warmup": 3, "volume": (180, 220, 180),
            "cases": 4, "pipeline_batches": 30, "planner": "nnsslPlanner", "plans": "nnsslPlans",
            "iterations": E2E_ITERATIONS}


# ------------------------------------------------------------------------------------------------ 1. the step
def measure_step(mode: str, size: dict, device: torch.device) -> dict:
    compile_, channels_last = MODES[mode]
    settings = Settings(size["preset"], size["batch"], device, size["repeats"], size["warmup"],
                        bf16=device.type == "cuda", channels_last=channels_last, compile=compile_)
    _, step = prepare("s3d", settings)
    started = time.perf_counter()
    for _ in range(settings.warmup):
        step()
    warmup_seconds = time.perf_counter() - started
    seconds = [timed(step, device) for _ in range(settings.repeats)]
    flops = count_flops("s3d", settings.preset, settings.batch)
    peak = device_peak_tflops(settings)
    median = summarize(seconds).median
    achieved = flops / median / 1e12
    return {"ms_per_step": [s * 1e3 for s in seconds], "steps_per_second": 1 / median,
            "warmup_seconds": warmup_seconds, "peak_memory_mib": peak_memory_bytes(step, device) / 2 ** 20,
            "tflops": achieved, "fraction_of_bf16_peak": achieved / peak if peak else None}


def measure_device_augmentation(size: dict, device: torch.device) -> dict:
    """The train step's spatial augmentation of one read-size batch on the device, and the batch's H2D copy."""
    trainer = loader_trainer(PIPELINES["s3d_pretraining"], size["preset"].patch_size)
    read_size = tuple(int(s) for s in trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2])
    host = torch.randn(size["batch"], 1, *read_size)
    if device.type == "cuda":
        host = host.pin_memory()
    augmentation = DeviceSpatialAugmentation(size["preset"].patch_size, SpatialAugmentationConfig(), seed=0)
    on_device = host.to(device)
    augment = [timed(lambda: augmentation(on_device), device) for _ in range(size["repeats"] + 1)][1:]
    copy = [timed(lambda: host.to(device, non_blocking=True), device) for _ in range(size["repeats"] + 1)][1:]
    return {"read_size": read_size, "augmentation_ms_per_batch": [s * 1e3 for s in augment],
            "host_to_device_ms_per_batch": [s * 1e3 for s in copy],
            "batch_mib": host.numel() * host.element_size() / 2 ** 20}


# ------------------------------------------------------------------------------------------------ 2. the pipeline
def measure_pipeline(size: dict, workers: int, pin_memory: bool, root: str) -> dict:
    """Patches/s of the S3D and nnU-Net default loaders through nnU-Net's augmenter with ``workers`` processes."""
    patch_size = tuple(size["preset"].patch_size)
    folders = write_datasets(root, size["cases"], size["volume"], patch_size, seed=0)
    rates = multiprocess_throughput(["s3d_pretraining", BASELINE], folders, patch_size, size["batch"], workers,
                                    size["pipeline_batches"], rounds=1, pin_memory=pin_memory)
    return {"workers": workers, "pin_memory": pin_memory,
            **{name: {"patches_per_second": values[0]} for name, values in rates.items()}}


# ------------------------------------------------------------------------------------------------ 3. end to end
def _command(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _run(args: list, env: dict) -> None:
    result = subprocess.run([_command(args[0])] + [str(a) for a in args[1:]], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")


def write_images(folder: Path, size: dict) -> None:
    """Head-like 1 mm volumes as NIfTI (the texture of data_pipeline's synthetic cases)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in range(size["cases"]):
        image, _ = synthetic_case(size["volume"], rng)
        itk = sitk.GetImageFromArray(image[0])
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, str(folder / f"head_{case:03d}.nii.gz"))


class UtilisationSampler:
    """``nvidia-smi`` utilisation samples (time, percent) in the background; nothing where there is no nvidia-smi."""

    def __init__(self, period_ms: int = 100) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,"
                                             "nounits", "-i", "0", "-lms", str(period_ms)],
                                            stdout=subprocess.PIPE, text=True)
            import threading

            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), float(line)))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def idle_fraction(self, start: float, end: float) -> Optional[float]:
        window = [u for t, u in self.samples if start <= t <= end]
        return 1 - float(np.mean(window)) / 100 if window else None


def measure_end_to_end(size: dict, workers: int, device: torch.device, root: Path) -> dict:
    dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "nnUNet_n_proc_DA": str(workers),
           "nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": str(size["iterations"]),
           "nnssl_val_iterations_per_epoch": "1", "nnUNet_def_n_proc": str(max(1, workers))}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    started = time.perf_counter()
    write_images(root / "images", size)
    _run(["nnssl_ingest", "-i", root / "images", "-d", E2E_DATASET_ID, "-n", "GpuCheck", "-np", workers], env)
    _run(["nnUNetv2_plan_and_preprocess", "-d", E2E_DATASET_ID, "-pl", size["planner"], "-c", "3d_fullres",
          "-np", workers, "-npfp", workers, "--no_pbar"], env)
    prepare_seconds = time.perf_counter() - started
    sampler = UtilisationSampler()
    started = time.perf_counter()
    try:
        _run(["nnUNetv2_train", E2E_DATASET_ID, "3d_fullres", "all", "-tr", "S3DPretrainTrainer", "-p",
              size["plans"], "-device", device.type], env)
    finally:
        sampler.stop()
    train_seconds = time.perf_counter() - started
    folder = next((dirs["nnUNet_results"]).glob(f"Dataset{E2E_DATASET_ID}_*/S3DPretrainTrainer__*/fold_all"))
    logging = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    start, end = logging["epoch_start_timestamps"][1], logging["epoch_end_timestamps"][1]
    return {"iterations_per_epoch": size["iterations"], "epochs": 2, "workers": workers,
            "prepare_seconds": prepare_seconds, "train_command_seconds": train_seconds,
            "epoch_1_seconds": end - start, "steps_per_second": size["iterations"] / (end - start),
            "gpu_idle_fraction": sampler.idle_fraction(start, end), "utilisation_samples": len(sampler.samples)}


# ------------------------------------------------------------------------------------------------ report
def report(results: dict) -> dict[str, list[float]]:
    steps = {mode: r for mode, r in results["step"].items() if "ms_per_step" in r}
    rows = [[mode, summarize(r["ms_per_step"]).format(), f"{r['steps_per_second']:.3g}", f"{r['warmup_seconds']:.1f}",
             f"{r['peak_memory_mib']:.0f}", f"{r['tflops']:.3g}",
             f"{100 * r['fraction_of_bf16_peak']:.1f}" if r["fraction_of_bf16_peak"] else "-"]
            for mode, r in steps.items()]
    rows += [[mode, r.get("skipped") or r.get("error"), "", "", "", "", ""] for mode, r in results["step"].items()
             if mode not in steps]
    print_table(f"S3D train step, {results['preset']} batch {results['batch']}, {results['device_name']}",
                ["mode", "ms/step", "steps/s", "warm-up s", "peak MiB", "TFLOP/s", "% of bf16 peak"], rows)
    augmentation = results["device_augmentation"]
    print(f"device augmentation of a {'x'.join(map(str, augmentation['read_size']))} batch: "
          f"{summarize(augmentation['augmentation_ms_per_batch']).format()} ms; host-to-device copy of its "
          f"{augmentation['batch_mib']:.0f} MiB: {summarize(augmentation['host_to_device_ms_per_batch']).format()} ms")
    eager = steps["eager"]["steps_per_second"]
    best_mode = max(steps, key=lambda m: steps[m]["steps_per_second"])
    best = steps[best_mode]["steps_per_second"]
    ratios = {f"s3d_step_{mode}_vs_eager": [steps[mode]["steps_per_second"] / eager] for mode in steps
              if mode != "eager"}
    if steps[best_mode]["fraction_of_bf16_peak"]:
        ratios["s3d_step_fraction_of_bf16_peak"] = [steps[best_mode]["fraction_of_bf16_peak"]]
    ratios["s3d_augmentation_vs_eager_step"] = [summarize(augmentation["augmentation_ms_per_batch"]).median
                                                / 1e3 * eager]
    pipeline, e2e = results["pipeline"], results["end_to_end"]
    if "error" not in pipeline:
        demand = best * results["batch"]
        s3d_rate = pipeline["s3d_pretraining"]["patches_per_second"]
        print(f"data pipeline, {pipeline['workers']} workers: S3D {s3d_rate:.1f} patches/s, nnU-Net default "
              f"{pipeline[BASELINE]['patches_per_second']:.1f}; the fastest step ({best_mode}) consumes {demand:.1f}")
        ratios["s3d_pipeline_patches_vs_step_demand"] = [s3d_rate / demand]
        ratios["s3d_pipeline_vs_nnunet_default_pipeline"] = [s3d_rate / pipeline[BASELINE]["patches_per_second"]]
    if "error" not in e2e:
        idle = e2e["gpu_idle_fraction"]
        print(f"nnUNetv2_train -tr S3DPretrainTrainer, epoch 1 of {e2e['iterations_per_epoch']} iterations: "
              f"{e2e['steps_per_second']:.3g} steps/s, GPU idle {'-' if idle is None else f'{100 * idle:.0f} %'}")
        ratios["end_to_end_steps_vs_eager_step"] = [e2e["steps_per_second"] / eager]
        if idle is not None:
            ratios["end_to_end_gpu_idle_fraction"] = [idle]
    return ratios


def _recorded(section: Callable[[], dict], out: str, results: dict) -> dict:
    """A section's figures, or its error (a one-shot check on a lent GPU keeps what the other sections measured);
    the JSON so far is written either way."""
    try:
        figures = section()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON and printed, the other sections still run
        print(f"section failed: {error!r}", file=sys.stderr)
        figures = {"error": repr(error)[-3000:]}
    Path(out).write_text(json.dumps(results, indent=2))
    return figures


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compile: checks the script")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--workers", type=int, default=None, help="augmentation workers (default: all cores; dry "
                                                                   "run 1)")
    parser.add_argument("--all-modes", action="store_true", help="also compile + channels-last")
    parser.add_argument("--workdir", default=None, help="where the generated data go (default: a temporary folder)")
    parser.add_argument("--budget-seconds", type=float, default=300,
                        help="start no optional step mode (channels-last, compile) after this many seconds")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
    size = _size(args.dry_run)
    workers = args.workers or (1 if args.dry_run else os.cpu_count())
    modes = [m for m in MODES if args.all_modes or m != "compile_channels_last"]  # eager first
    results = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "preset": size["preset"].name, "batch": size["batch"], "dry_run": args.dry_run, "step": {}}
    started = time.perf_counter()
    results["step"]["eager"] = measure_step("eager", size, device)
    results["device_augmentation"] = measure_device_augmentation(size, device)
    with tempfile.TemporaryDirectory(prefix="nnssl_gpu_check_", dir=args.workdir) as root:
        results["pipeline"] = _recorded(lambda: measure_pipeline(size, workers, device.type == "cuda",
                                                                 os.path.join(root, "pipeline")), args.out, results)
        results["end_to_end"] = _recorded(lambda: measure_end_to_end(size, workers, device,
                                                                     Path(root) / "end_to_end"), args.out, results)
    for mode in modes[1:]:  # the optional modes last, while the time budget lasts (compiling takes minutes)
        elapsed = time.perf_counter() - started
        if args.dry_run and MODES[mode][0]:
            results["step"][mode] = {"skipped": "dry run (compiling takes minutes on a CPU)"}
        elif elapsed > args.budget_seconds:
            results["step"][mode] = {"skipped": f"time budget ({elapsed:.0f} s of {args.budget_seconds} s used)"}
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["step"][mode] = _recorded(lambda: measure_step(mode, size, device), args.out, results)
    results["seconds"] = time.perf_counter() - started
    ratios = report(results)
    results["ratios"] = {name: values[0] for name, values in ratios.items()}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{args.out} written ({results['seconds']:.0f} s)")
    print_ratio_lines(ratios)
    failed = [name for name, figures in [*results["step"].items(), ("pipeline", results["pipeline"]),
                                         ("end_to_end", results["end_to_end"])] if "error" in figures]
    if failed:
        sys.exit(f"failed sections (errors in {args.out}): {', '.join(failed)}")


if __name__ == "__main__":
    main()
