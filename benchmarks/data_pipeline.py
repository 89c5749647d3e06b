"""Patches per second per augmentation worker: the pretraining loader + transforms vs nnU-Net's default pipeline.

Why: a GPU step only helps if the CPU workers keep up; this says how many workers a GPU step rate needs, and whether
the pretraining pipeline is at least as cheap per worker as the supervised one nnU-Net users already provision for.

Every pipeline is a trainer's own code on the real read path: synthetic z-scored volumes (realistic size, default
4 x 180x220x180 float32) are written with nnU-Net's ``nnUNetDatasetBlosc2.save_case`` (blosc2 parameters from
``comp_blosc2_params`` for the patch, as nnU-Net's preprocessor does) and read back through ``nnUNetDatasetBlosc2`` and
the trainer's loader class (``nnUNetDataLoader``; nnssl's ``PretrainingDataLoader``); the initial (pre-augmentation)
patch size, rotation and mirror axes come from the trainer's
``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, the transforms from its ``get_training_transforms``,
the foreground oversampling and deep supervision from its ``__init__`` values (the trainer object is made without
``__init__``, with just the attributes its data methods read). nnU-Net's default reads a labelled segmentation (a
foreground blob, -1 outside the head as after nnU-Net's crop); the pretraining pipelines read the placeholder label
map of ``nnssl_ingest`` (1 = anatomy everywhere) when their loss uses it.

One worker = ``next()`` on the loader in the main process with one intra-op thread (nnU-Net's loader limits its
thread pools to one per worker). Trainers that augment on the training device (S3D, MAE) leave the spatial
augmentation to the train step; its cost is timed apart (on this CPU, one thread) and is not a worker's.
``s3d_pretraining_cpuDA`` is the same S3D pipeline with the spatial augmentation in the worker (before device
augmentation). The workers-needed lines divide a GPU step rate by the per-worker rate. Add a pipeline by adding a
``PipelineSpec`` to ``PIPELINES``.

Usage: ``python benchmarks/data_pipeline.py [--quick] [--pipelines ...] [--gpu-steps-per-second S]``; needs the
installed package (``pip install --no-deps .``) or ``PYTHONPATH`` set to a source checkout.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from _common import (base_parser, per_round_ratios, preset_configuration, print_ratio_lines, print_table,
                     run_interleaved, summarize, timed, torch_threads)
from nnssl.presets import RESENC_L
from nnssl.trainers.amaes import AMAESPretrainTrainer
from nnssl.trainers.models_genesis import ModelsGenesisPretrainTrainer
from nnssl.trainers.s3d import MAEPretrainTrainer, S3DPretrainTrainer, S3DPretrainTrainer_cpuDA
from nnssl.trainers.voco import VoCoPretrainTrainer
from nnssl.trainers.volume_fusion import VolumeFusionPretrainTrainer

BASELINE = "nnunet_default"
SUPERVISED_LABELS = {"background": 0, "foreground": 1}
INGEST_LABELS = {"background": 0, "anatomy": 1}  # nnssl_ingest's placeholder label map (no anonymisation masks)
CLASS_LOCATION_SAMPLES = 10000  # as nnU-Net's preprocessor stores per label
# ingest without anonymisation masks: the S3D-family loss reads no region map
S3D_INGEST = {"exclude_anonymised": False}
# the target step of issue 11: S3D at 40 % of an H200's bf16 peak, ResEnc-L batch 6 at 160^3, about 0.16 s per step
TARGET_STEPS_PER_SECOND = 6.25


@dataclass(frozen=True)
class PipelineSpec:
    """One training data pipeline: the trainer whose methods define it, and the values its ``__init__`` sets."""

    trainer: type
    dataset: str  # "supervised" (labelled segmentation) or "pretraining" (ingest placeholder labels)
    oversample_foreground_percent: float
    deep_supervision: bool
    attributes: tuple = ()  # (name, value) pairs the trainer's __init__ would set


def _pretraining(trainer: type, **attributes) -> PipelineSpec:
    """``case_subjects``: None as under the default per-image sampling (``nnssl_sampling=image``)."""
    return PipelineSpec(trainer, "pretraining", oversample_foreground_percent=0.0, deep_supervision=False,
                        attributes=tuple({"case_subjects": None, **attributes}.items()))


PIPELINES: dict[str, PipelineSpec] = {
    BASELINE: PipelineSpec(nnUNetTrainer, "supervised", oversample_foreground_percent=0.33, deep_supervision=True),
    "s3d_pretraining": _pretraining(S3DPretrainTrainer, **S3D_INGEST),
    "s3d_pretraining_cpuDA": _pretraining(S3DPretrainTrainer_cpuDA, **S3D_INGEST),
    "mae_pretraining": _pretraining(MAEPretrainTrainer, **S3D_INGEST),
    "amaes_pretraining": _pretraining(AMAESPretrainTrainer, **S3D_INGEST),
    "models_genesis_pretraining": _pretraining(ModelsGenesisPretrainTrainer),
    "voco_pretraining": _pretraining(VoCoPretrainTrainer, crop_geometry=VoCoPretrainTrainer.geometry),
    "volume_fusion_pretraining": _pretraining(VolumeFusionPretrainTrainer),
}


def loader_trainer(spec: PipelineSpec, patch_size: tuple[int, ...]) -> nnUNetTrainer:
    """The trainer without its ``__init__``: only what its data set-up methods read (a missing attribute fails).

    VoCo crops its own patch (its ``__init__`` swaps the plans' patch for the crop geometry's), so does this.
    """
    trainer = object.__new__(spec.trainer)
    attributes = dict(spec.attributes)
    if "crop_geometry" in attributes:
        patch_size = attributes["crop_geometry"].patch_size
    trainer.configuration_manager = preset_configuration(RESENC_L, patch_size)
    trainer.enable_deep_supervision = spec.deep_supervision
    trainer.inference_allowed_mirroring_axes = None
    trainer.is_ddp = False
    trainer.device = torch.device("cpu")
    trainer.print_to_log_file = lambda *args, **kwargs: None  # trainers log set-up details; we print a table
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def synthetic_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A z-scored head-like volume (smooth texture plus noise inside an ellipsoid) and the ellipsoid mask.

    The texture matters: blosc2 decompression cost depends on how well the data compresses (about 3x here, similar
    to preprocessed MRI), so constant or white-noise volumes would misstate the read cost.
    """
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 9, 11, 9)).astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    head = sum(((g - s / 2) / (0.45 * s)) ** 2 for g, s in zip(grids, shape)) <= 1
    noise = rng.standard_normal(shape, dtype=np.float32)
    image = np.where(head, 1 + 0.5 * texture + 0.1 * noise, 0).astype(np.float32)
    return ((image - image.mean()) / image.std())[None], head


def segmentations(shape: tuple[int, int, int], head: np.ndarray) -> dict[str, np.ndarray]:
    """Label maps per dataset kind, (1, *shape) int16 as nnU-Net stores them."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    blob = sum(((g - 0.55 * s) / 25.0) ** 2 for g, s in zip(grids, shape)) <= 1
    supervised = np.where(head, blob.astype(np.int16), np.int16(-1))
    return {"supervised": supervised[None], "pretraining": np.ones((1, *shape), dtype=np.int16)}


def class_locations(seg: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Sampled voxel coordinates (channel, x, y, z) per label, the preprocessor's ``class_locations`` property."""
    coordinates = np.argwhere(seg == 1)
    keep = rng.choice(len(coordinates), min(CLASS_LOCATION_SAMPLES, len(coordinates)), replace=False)
    return {1: coordinates[np.sort(keep)]}


def write_datasets(root: str, n_cases: int, shape: tuple[int, int, int], patch_size: tuple[int, ...],
                   seed: int) -> dict[str, str]:
    """One preprocessed-data folder per dataset kind, same images, written by nnU-Net's blosc2 writer."""
    rng = np.random.default_rng(seed)
    folders = {kind: os.path.join(root, kind) for kind in ("supervised", "pretraining")}
    for folder in folders.values():
        os.makedirs(folder)
    for case in range(n_cases):
        image, head = synthetic_case(shape, rng)
        blocks, chunks = comp_blosc2_params(image.shape, patch_size, image.itemsize)
        for kind, seg in segmentations(shape, head).items():
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
            nnUNetDatasetBlosc2.save_case(image, seg, {"class_locations": class_locations(seg, rng)},
                                          os.path.join(folders[kind], f"case_{case:03d}"), chunks=chunks,
                                          blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return folders


def build_loader(trainer: nnUNetTrainer, spec: PipelineSpec, folder: str, batch: int,
                 stock_loader: bool = False) -> nnUNetDataLoader:
    """The training loader as ``get_dataloaders`` builds it for ``spec.trainer`` (nnssl's loader class for nnssl;
    ``stock_loader``: nnU-Net's for every pipeline, which always reads the region map, as before nnssl's loader)."""
    patch_size = tuple(trainer.configuration_manager.patch_size)
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels = SUPERVISED_LABELS if spec.dataset == "supervised" else INGEST_LABELS
    label_manager = LabelManager(labels, regions_class_order=None)
    transforms = trainer.get_training_transforms(
        patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=[False], is_cascaded=False, foreground_labels=label_manager.foreground_labels, regions=None,
        ignore_label=None)
    own_loader = hasattr(trainer, "data_loader_class") and not stock_loader
    loader_class = trainer.data_loader_class() if own_loader else nnUNetDataLoader
    return loader_class(nnUNetDatasetBlosc2(folder), batch, initial_patch_size, patch_size, label_manager,
                        oversample_foreground_percent=spec.oversample_foreground_percent,
                        sampling_probabilities=None, pad_sides=None, transforms=transforms)


def device_part(trainer: nnUNetTrainer) -> Callable[[dict], object] | None:
    """What the train step does to a batch before the network (device augmentation), if the trainer does anything."""
    if not getattr(trainer, "spatial_augmentation_on_device", False):
        return None
    trainer.device_augmentation = trainer.build_device_augmentation()
    return trainer.device_training_batch


@dataclass
class Measurement:
    """Seconds per patch per round: in the worker, and (device-augmented pipelines) in the train step."""

    worker: list[float]
    device: list[float]
    read_size: tuple[int, ...]


def measure(names: list[str], folders: dict[str, str], patch_size: tuple[int, ...], batch: int, batches_per_round: int,
            rounds: int, seed: int, stock_loader: bool = False) -> dict[str, Measurement]:
    """Mean seconds per patch of each pipeline per round (interleaved), worker and device part apart.

    Augmentations are drawn per sample (rotation/scaling with p 0.2, intensity transforms with their own p), so single
    batches range from a plain crop to the full stack: a worker's throughput is the mean over many patches, hence
    several batches per round and the median/spread over rounds of those means. Every pipeline starts round r from
    the same random state (common random numbers): pipelines that draw alike (same loader, same spatial transform
    first) then read the same crops with the same spatial augmentation, and their per-round ratio compares the
    pipelines rather than the luck of the draw. The device part (the train step's augmentation of the batch) runs
    here on this machine's CPU with one thread; in training it runs on the GPU (``gpu_check.py`` times it there).
    """
    measurements, rounds_fns = {}, {}
    for name in names:
        spec = PIPELINES[name]
        trainer = loader_trainer(spec, patch_size)
        loader = build_loader(trainer, spec, folders[spec.dataset], batch, stock_loader)
        measurements[name] = Measurement([], [], tuple(int(s) for s in loader.patch_size))
        rounds_fns[name] = _seeded_rounds(loader, device_part(trainer), batches_per_round, seed,
                                          measurements[name].device, batch)
    with torch_threads(1):
        for name in names:
            rounds_fns[name](warm_up=True)  # first reads, grid caches
        worker_seconds: dict[str, list[float]] = run_interleaved(rounds_fns, rounds)
    for name, seconds in worker_seconds.items():
        measurements[name].worker = [s / (batch * batches_per_round) for s in seconds]
    return measurements


def _seeded_rounds(loader: nnUNetDataLoader, device_step: Callable[[dict], object] | None, batches: int, seed: int,
                   device_seconds: list[float], batch: int) -> Callable[..., float]:
    """Worker seconds for ``batches`` batches, the k-th call starting from random state ``seed + k``; the device
    part's seconds per patch are appended to ``device_seconds``."""
    round_index = 0
    cpu = torch.device("cpu")

    def run(warm_up: bool = False) -> float:
        nonlocal round_index
        if warm_up:
            batch_ = next(loader)
            if device_step is not None:
                device_step(batch_)
            return 0.0
        np.random.seed(seed + round_index)
        torch.manual_seed(seed + round_index)
        round_index += 1
        produced = []
        worker = timed(lambda: produced.extend(next(loader) for _ in range(batches)), cpu)
        if device_step is not None:
            device = timed(lambda: [device_step(b) for b in produced], cpu)
            device_seconds.append(device / (batch * batches))
        return worker

    return run


def multiprocess_throughput(names: list[str], folders: dict[str, str], patch_size: tuple[int, ...], batch: int,
                            workers: int, batches: int, rounds: int, pin_memory: bool) -> dict[str, list[float]]:
    """Patches/s per round of each pipeline through nnU-Net's ``NonDetMultiThreadedAugmenter`` with ``workers``
    processes, as the train loop receives them: the copy of every batch through the workers' queues (shared memory)
    is included, which the in-process timing of ``measure`` leaves out. Pipelines take turns, one at a time, each
    round starting its augmenter afresh (start-up and the batches buffered meanwhile not timed)."""
    loaders = {}
    for name in names:
        spec = PIPELINES[name]
        loaders[name] = build_loader(loader_trainer(spec, patch_size), spec, folders[spec.dataset], batch)

    num_cached = max(6, workers // 2)  # as nnU-Net's get_dataloaders
    timed_batches = max(batches, 2 * num_cached)

    def one_round(loader: nnUNetDataLoader) -> float:
        augmenter = NonDetMultiThreadedAugmenter(loader, None, workers, num_cached=num_cached, seeds=None,
                                                 pin_memory=pin_memory, wait_time=0.002)
        try:
            # drain what start-up buffered (two queues of num_cached, one batch per worker): then it is steady state
            for _ in range(2 * num_cached + workers):
                next(augmenter)
            seconds = timed(lambda: [next(augmenter) for _ in range(timed_batches)], torch.device("cpu"))
            return timed_batches * batch / seconds
        finally:
            augmenter._finish()

    return run_interleaved({name: (lambda loader=loader: one_round(loader)) for name, loader in loaders.items()},
                           rounds)


def report(measurements: dict[str, Measurement], patches: int, rounds: int, steps_per_second: float,
           gpu_batch: int) -> dict[str, list[float]]:
    """The table and the workers-needed lines; returns the headline throughput ratios (over nnU-Net default's)."""
    needed = steps_per_second * gpu_batch
    rows, ratios, workers = [], {}, {}
    for name, m in measurements.items():
        throughput = 1.0 / summarize(m.worker).median
        vs_baseline = per_round_ratios(measurements[BASELINE].worker, m.worker)  # time ratio inverted = throughput
        # all patches of the run pooled (every round has the same count): the mean rate a worker sustains
        pooled = sum(measurements[BASELINE].worker) / sum(m.worker)
        if name != BASELINE:
            ratios[f"{name}_throughput_vs_{BASELINE}"] = vs_baseline
            ratios[f"{name}_mean_throughput_vs_{BASELINE}"] = [pooled]
        workers[name] = math.ceil(needed / throughput)
        device = summarize(m.device).format(1e3) if m.device else "-"
        rows.append([name, "x".join(map(str, m.read_size)), summarize(m.worker).format(1e3), f"{throughput:.2f}",
                     summarize(vs_baseline).format(), f"{pooled:.2f}", device, str(workers[name])])
    print_table(f"Data pipeline per worker (1 thread), {rounds} interleaved rounds of {patches} patches each, "
                f"median [min..max] of the per-round means",
                ["pipeline", "read patch", "worker ms/patch", "patches/s", f"throughput x {BASELINE} per round",
                 "x over all patches",
                 "train-step augmentation ms/patch (this CPU)", f"workers for {steps_per_second:g} steps/s"], rows)
    print(f"\nWorkers a GPU needs at {steps_per_second:g} steps/s x batch {gpu_batch} = {needed:g} patches/s "
          f"(nnUNet_n_proc_DA, one core each), at this machine's per-worker rate:")
    for name, count in workers.items():
        print(f"  {name}: {count}")
    return ratios


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="synthetic volumes (default 4, --quick 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=(180, 220, 180))
    parser.add_argument("--patch", type=int, nargs=3, default=RESENC_L.patch_size)
    parser.add_argument("--batch", type=int, default=2, help="loader batch size")
    parser.add_argument("--batches-per-round", type=int, default=None, help="default 5, --quick 3")
    parser.add_argument("--gpu-steps-per-second", type=float, default=TARGET_STEPS_PER_SECOND,
                        help="step rate the workers must feed (default: S3D at 40 %% of an H200's bf16 peak)")
    parser.add_argument("--gpu-batch", type=int, default=RESENC_L.batch_size)
    parser.add_argument("--processes", type=int, default=0,
                        help="also measure patches/s through nnU-Net's multi-process augmenter with this many "
                             "workers (what the train loop receives, inter-process copies included)")
    parser.add_argument("--stock-loader", action="store_true",
                        help="read every pipeline through nnU-Net's nnUNetDataLoader (the state before nnssl's loader)")
    parser.add_argument("--pipelines", nargs="+", choices=sorted(PIPELINES), default=sorted(PIPELINES))
    args = parser.parse_args()
    cases = args.cases or (2 if args.quick else 4)
    rounds = args.repeats or (3 if args.quick else 8)
    batches_per_round = args.batches_per_round or (3 if args.quick else 5)
    names = [BASELINE] + [n for n in PIPELINES if n in args.pipelines and n != BASELINE]
    patch_size = tuple(args.patch)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="nnssl_data_pipeline_") as root:
        folders = write_datasets(root, cases, tuple(args.shape), patch_size, args.seed)
        measurements = measure(names, folders, patch_size, args.batch, batches_per_round, rounds, args.seed,
                               args.stock_loader)
        rates = multiprocess_throughput(names, folders, patch_size, args.batch, args.processes,
                                        batches_per_round * args.processes, rounds, pin_memory=False) \
            if args.processes else None
    print(f"{cases} synthetic volumes of {'x'.join(map(str, args.shape))} float32, patch "
          f"{'x'.join(map(str, patch_size))}{', nnU-Net loader for every pipeline' if args.stock_loader else ''}")
    ratios = report(measurements, args.batch * batches_per_round, rounds, args.gpu_steps_per_second,
                    args.gpu_batch)
    if rates is not None:
        rows = [[name, summarize(values).format(), summarize(per_round_ratios(values, rates[BASELINE])).format()]
                for name, values in rates.items()]
        print_table(f"Through nnU-Net's augmenter, {args.processes} worker processes, {rounds} rounds, "
                    f"median [min..max]",
                    ["pipeline", "patches/s", f"x {BASELINE}"], rows)
        ratios.update({f"{name}_multiprocess_throughput_vs_{BASELINE}": per_round_ratios(values, rates[BASELINE])
                       for name, values in rates.items() if name != BASELINE})
    print_ratio_lines(ratios)


if __name__ == "__main__":
    main()
