"""Patches per second per augmentation worker: the pretraining loader + transforms vs nnU-Net's default pipeline.

Why: a GPU step only helps if the CPU workers keep up; this says how many workers a GPU step rate needs, and whether
the pretraining pipeline is at least as cheap per worker as the supervised one nnU-Net users already provision for.

Every pipeline is a trainer's own code on the real read path: synthetic z-scored volumes (realistic size, default
4 x 180x220x180 float32) are written with nnU-Net's ``nnUNetDatasetBlosc2.save_case`` (blosc2 parameters from
``comp_blosc2_params`` for the patch, as nnU-Net's preprocessor does) and read back through ``nnUNetDatasetBlosc2`` and
``nnUNetDataLoader``; the initial (pre-augmentation) patch size, rotation and mirror axes come from the trainer's
``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, the transforms from its ``get_training_transforms``,
the foreground oversampling and deep supervision from its ``__init__`` values. nnU-Net's default reads a labelled
segmentation (a foreground blob, -1 outside the head as after nnU-Net's crop); the pretraining pipelines read the
placeholder label map of ``nnssl_ingest`` (1 = anatomy everywhere).

One worker = ``next()`` on the loader in the main process with one intra-op thread (nnU-Net's loader limits its
thread pools to one per worker). Add a pipeline by adding a ``PipelineSpec`` to ``PIPELINES``.

Usage: ``python benchmarks/data_pipeline.py [--quick]``; needs the installed package (``pip install --no-deps .``).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from _common import (TrainerHost, base_parser, per_round_ratios, preset_configuration, print_ratio_lines, print_table,
                     run_interleaved, summarize, timed, torch_threads)
from nnssl.presets import RESENC_L
from nnssl.trainers.s3d import S3DPretrainTrainer

BASELINE = "nnunet_default"
SUPERVISED_LABELS = {"background": 0, "foreground": 1}
INGEST_LABELS = {"background": 0, "anatomy": 1}  # nnssl_ingest's placeholder label map (no anonymisation masks)
CLASS_LOCATION_SAMPLES = 10000  # as nnU-Net's preprocessor stores per label


@dataclass(frozen=True)
class PipelineSpec:
    """One training data pipeline: the trainer whose methods define it, and the values its ``__init__`` sets."""

    trainer: type
    dataset: str  # "supervised" (labelled segmentation) or "pretraining" (ingest placeholder labels)
    oversample_foreground_percent: float
    deep_supervision: bool


PIPELINES: dict[str, PipelineSpec] = {
    BASELINE: PipelineSpec(nnUNetTrainer, "supervised", oversample_foreground_percent=0.33, deep_supervision=True),
    "s3d_pretraining": PipelineSpec(S3DPretrainTrainer, "pretraining", oversample_foreground_percent=0.0,
                                    deep_supervision=False),
}
try:
    from nnssl.trainers.amaes import AMAESPretrainTrainer

    PIPELINES["amaes_pretraining"] = PipelineSpec(AMAESPretrainTrainer, "pretraining",
                                                  oversample_foreground_percent=0.0, deep_supervision=False)
except ImportError:  # AMAES not installed in this version of the package
    pass


class _LoaderHost(TrainerHost):
    """What the trainers' data set-up methods read (patch size, deep supervision)."""

    _get_deep_supervision_scales = nnUNetTrainer._get_deep_supervision_scales

    def __init__(self, patch_size: tuple[int, ...], deep_supervision: bool) -> None:
        super().__init__(preset_configuration(RESENC_L, patch_size))
        self.enable_deep_supervision = deep_supervision
        self.inference_allowed_mirroring_axes = None


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


def build_loader(spec: PipelineSpec, folder: str, patch_size: tuple[int, ...], batch: int) -> nnUNetDataLoader:
    """The training loader as ``nnUNetTrainer.get_dataloaders`` builds it for ``spec.trainer``."""
    host = _LoaderHost(patch_size, spec.deep_supervision)
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        spec.trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(host)
    labels = SUPERVISED_LABELS if spec.dataset == "supervised" else INGEST_LABELS
    label_manager = LabelManager(labels, regions_class_order=None)
    transforms = spec.trainer.get_training_transforms(
        patch_size, rotation, host._get_deep_supervision_scales(), mirror_axes, dummy_2d, use_mask_for_norm=[False],
        is_cascaded=False, foreground_labels=label_manager.foreground_labels, regions=None, ignore_label=None)
    return nnUNetDataLoader(nnUNetDatasetBlosc2(folder), batch, initial_patch_size, patch_size, label_manager,
                            oversample_foreground_percent=spec.oversample_foreground_percent,
                            sampling_probabilities=None, pad_sides=None, transforms=transforms)


def measure(names: list[str], folders: dict[str, str], patch_size: tuple[int, ...], batch: int, batches_per_round: int,
            rounds: int, seed: int) -> tuple[dict[str, list[float]], dict[str, tuple[int, ...]]]:
    """Mean seconds per patch of each pipeline per round (interleaved), and the read (initial) patch sizes.

    Augmentations are drawn per sample (rotation/scaling with p 0.2, intensity transforms with their own p), so single
    batches range from a plain crop to the full stack: a worker's throughput is the mean over many patches, hence
    several batches per round and the median/spread over rounds of those means. Every pipeline starts round r from
    the same random state (common random numbers): pipelines that draw alike (same loader, same spatial transform
    first) then read the same crops with the same spatial augmentation, and their per-round ratio compares the
    pipelines rather than the luck of the draw.
    """
    loaders = {name: build_loader(PIPELINES[name], folders[PIPELINES[name].dataset], patch_size, batch)
               for name in names}
    cpu = torch.device("cpu")
    with torch_threads(1):
        for loader in loaders.values():
            next(loader)  # warm-up: first reads, grid caches
        batch_seconds: dict[str, list[float]] = run_interleaved(
            {name: _seeded_rounds(loader, batches_per_round, seed, cpu) for name, loader in loaders.items()}, rounds)
    patches = batch * batches_per_round
    seconds_per_patch = {name: [s / patches for s in seconds] for name, seconds in batch_seconds.items()}
    return seconds_per_patch, {name: tuple(int(s) for s in loader.patch_size) for name, loader in loaders.items()}


def _seeded_rounds(loader: nnUNetDataLoader, batches: int, seed: int, device: torch.device) -> Callable[[], float]:
    """Seconds for ``batches`` batches, the k-th call starting from random state ``seed + k``."""
    round_index = 0

    def run() -> float:
        nonlocal round_index
        np.random.seed(seed + round_index)
        torch.manual_seed(seed + round_index)
        round_index += 1
        return timed(lambda: [next(loader) for _ in range(batches)], device)

    return run


def report(seconds_per_patch: dict[str, list[float]], initial_sizes: dict[str, tuple[int, ...]], patches: int,
           rounds: int, steps_per_second: float, gpu_batch: int) -> dict[str, list[float]]:
    """The table; returns the headline throughput ratios (pipeline patches/s over nnU-Net default's)."""
    needed = steps_per_second * gpu_batch
    rows, ratios = [], {}
    for name, seconds in seconds_per_patch.items():
        throughput = 1.0 / summarize(seconds).median
        vs_baseline = per_round_ratios(seconds_per_patch[BASELINE], seconds)  # time ratio inverted = throughput
        if name != BASELINE:
            ratios[f"{name}_throughput_vs_{BASELINE}"] = vs_baseline
        rows.append([name, "x".join(map(str, initial_sizes[name])), summarize(seconds).format(1e3),
                     f"{throughput:.2f}", summarize(vs_baseline).format(), str(math.ceil(needed / throughput))])
    print_table(f"Data pipeline per worker (1 thread), {rounds} interleaved rounds of {patches} patches each, "
                f"median [min..max] of the per-round means",
                ["pipeline", "read patch", "ms/patch", "patches/s", f"throughput x {BASELINE}",
                 f"workers for {steps_per_second:g} steps/s x batch {gpu_batch}"], rows)
    return ratios


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="synthetic volumes (default 4, --quick 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=(180, 220, 180))
    parser.add_argument("--patch", type=int, nargs=3, default=RESENC_L.patch_size)
    parser.add_argument("--batch", type=int, default=2, help="loader batch size")
    parser.add_argument("--batches-per-round", type=int, default=None, help="default 5, --quick 3")
    parser.add_argument("--gpu-steps-per-second", type=float, default=1.0)
    parser.add_argument("--gpu-batch", type=int, default=RESENC_L.batch_size)
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
        seconds, initial_sizes = measure(names, folders, patch_size, args.batch, batches_per_round, rounds,
                                         args.seed)
    print(f"{cases} synthetic volumes of {'x'.join(map(str, args.shape))} float32, patch "
          f"{'x'.join(map(str, patch_size))}")
    ratios = report(seconds, initial_sizes, args.batch * batches_per_round, rounds, args.gpu_steps_per_second,
                    args.gpu_batch)
    print_ratio_lines(ratios)


if __name__ == "__main__":
    main()
