"""``nnssl_demo_data``: small, reproducible synthetic head MRI, so every nnssl step can be tried without real data.

Two products:

* ``DIR/unlabeled/``: head-like volumes as they come from real archives: varied spacings (0.8-2.5 mm, some
  anisotropic), orientations (axis permutations/flips and an oblique one), sizes, intensity ranges, pixel types
  (uint16, int16, float32) and formats (.nii.gz, .nrrd, .mha); anatomy masks (head = 1) for every other image in
  ``DIR/unlabeled_masks/anatomy/`` under the image's file name. Input for ``nnssl_ingest``.
* ``$nnUNet_raw/Dataset{ID:03d}_nnsslDemoLabeled``: a labeled nnU-Net dataset whose target (label 1) is the pair of
  lateral ventricles, drawn from the same synthetic anatomy as the unlabeled heads (so pretraining has something to
  transfer). They have CSF intensity, like the CSF rim under the skull, so no intensity threshold finds them: they
  are defined by shape and position (size and place vary per head).

The head is defined in world (mm) coordinates and sampled on each image's own grid, so a volume stored with an
unusual orientation still shows a correctly oriented head once its geometry is applied. Every volume draws from
its own random stream derived from (seed, kind, index): the same seed gives identical arrays.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

DESCRIPTION = """\
Write small, reproducible synthetic head MRI so nnssl can be tried without real data:
  DIR/unlabeled/                 head volumes with mixed spacings, orientations, sizes, pixel types and formats
                                 (.nii.gz, .nrrd, .mha), the input for nnssl_ingest
  DIR/unlabeled_masks/anatomy/   head masks for every other volume, same file names (nnssl_ingest --anatomy_masks)
  $nnUNet_raw/Dataset<ID>_nnsslDemoLabeled
                                 labeled nnU-Net dataset: label 1 = the lateral ventricles (CSF intensity, found
                                 by shape and position, not by a threshold)
The same seed always gives the same data."""
DEFAULT_LABELED_ID = 502
LABELED_NAME = "nnsslDemoLabeled"
UNLABELED_FOLDER = "unlabeled"
ANATOMY_MASK_FOLDER = os.path.join("unlabeled_masks", "anatomy")
FORMATS = (".nii.gz", ".nrrd", ".mha")
PIXEL_TYPES = (np.uint16, np.int16, np.float32)
UNLABELED_STREAM, LABELED_STREAM, TEST_STREAM = 1, 2, 3

# T1-like tissue intensities before scaling: outside -> inside
SCALP, SKULL, CSF, GREY, WHITE = 0.75, 0.08, 0.2, 0.45, 0.65
EDGE_MM = 0.7  # width of the soft tissue boundaries
BRAIN_EDGE = 0.8  # normalised head radius of the grey-matter surface: the brain lies inside it


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


# columns are the world directions of the grid axes (SimpleITK convention)
ORIENTATIONS = (
    np.eye(3),                                                        # axial, identity
    np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]),                  # sagittal slices (axis permutation)
    _rotation(0, 14) @ _rotation(2, -9),                              # oblique
    np.diag([-1.0, -1.0, 1.0]),                                       # axial, flipped (RAS-style)
    np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),                   # coronal slices
)
SPACINGS = ((1.0, 1.0, 1.0), (0.9, 0.9, 2.5), (1.2, 1.2, 1.2), (0.8, 0.8, 0.8), (2.0, 1.0, 1.0), (1.5, 1.5, 1.5))


@dataclass(frozen=True)
class Grid:
    """An image grid: size (x, y, z voxels), spacing (mm), 3x3 direction, origin (mm)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray

    def world_coordinates(self) -> np.ndarray:
        """World position (mm) of every voxel, shape (3, z, y, x) to match SimpleITK's array order."""
        index = np.indices(self.size[::-1], dtype=np.float64)[::-1]  # (x, y, z) index per voxel
        scaled = index * np.asarray(self.spacing)[:, None, None, None]
        return np.einsum("ij,jzyx->izyx", self.direction, scaled) + self.origin[:, None, None, None]

    def image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetDirection([float(d) for d in self.direction.ravel()])
        image.SetOrigin([float(o) for o in self.origin])
        return image


def centred_grid(size: Sequence[int], spacing: Sequence[float], direction: np.ndarray,
                 centre: np.ndarray) -> Grid:
    """The grid with this size/spacing/direction whose middle lies at ``centre`` (world mm)."""
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), direction, centre - half)


def _inside(q: np.ndarray, edge: float, width: float) -> np.ndarray:
    """Soft indicator of ``q < edge`` (1 inside, 0 outside), blurred over ``width``, without overflow."""
    return 0.5 * (1.0 - np.tanh((q - edge) / width))


def _ellipsoid_radius(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius: < 1 inside the axis-aligned ellipsoid, 1 on its surface."""
    return np.sqrt(np.sum(((points - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2, axis=0))


def _waves(rng: np.random.Generator, count: int, wavelengths_mm: Tuple[float, float]) -> tuple:
    """Random plane waves (wave vectors, phases, amplitudes): a cheap smooth random field in world space."""
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = directions * (2 * np.pi / rng.uniform(*wavelengths_mm, size=(count, 1)))
    return vectors, rng.uniform(0, 2 * np.pi, count), rng.uniform(0.5, 1.0, count)


def _field(points: np.ndarray, waves: tuple) -> np.ndarray:
    """The wave sum at ``points``, normalised to [-1, 1]."""
    vectors, phases, amplitudes = waves
    total = np.zeros(points.shape[1:])
    for vector, phase, amplitude in zip(vectors, phases, amplitudes):
        total += amplitude * np.cos(np.einsum("i,izyx->zyx", vector, points) + phase)
    return total / amplitudes.sum()


@dataclass(frozen=True)
class HeadAnatomy:
    """One head's geometry (mm, head centre at 0): ellipsoid semi-axes and the two lateral ventricles."""

    semi_axes: np.ndarray
    ventricle_centres: Tuple[np.ndarray, np.ndarray]
    ventricle_radii: Tuple[np.ndarray, np.ndarray]

    @classmethod
    def draw(cls, semi_axes: np.ndarray, rng: np.random.Generator) -> "HeadAnatomy":
        """Ventricles of random size (about 0.75-1.3x) and slight random placement and asymmetry (together 1-3 % of
        the head, about what the lateral ventricles of an adult brain occupy)."""
        scale, shift = rng.uniform(0.75, 1.3), rng.uniform(-0.04, 0.04, 3)
        centres, radii = [], []
        for side in (-1, 1):
            centres.append((np.array([side * 0.2, 0.05, 0.12]) + shift + rng.uniform(-0.015, 0.015, 3)) * semi_axes)
            radii.append(np.array([0.14, 0.34, 0.21]) * scale * rng.uniform(0.9, 1.1, 3) * semi_axes)
        return cls(semi_axes, tuple(centres), tuple(radii))

    def brain(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the brain (grey and white matter with their sulci, inside the CSF rim) at ``points``."""
        return _ellipsoid_radius(points, np.zeros(3), self.semi_axes) <= BRAIN_EDGE

    def ventricles(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the ventricles at ``points``."""
        inside = np.zeros(points.shape[1:], dtype=bool)
        for centre, radii in zip(self.ventricle_centres, self.ventricle_radii):
            inside |= _ellipsoid_radius(points, centre, radii) <= 1.0
        return inside


def render_head(points: np.ndarray, anatomy: HeadAnatomy, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Noisy head intensities (>= 0) and the head mask at ``points`` (mm, head centre at 0).

    Layers: scalp, skull, CSF, folded grey/white matter with CSF-filled sulci and texture, the two ventricles (CSF),
    a few blob
    structures; then a smooth bias field and Rician noise.
    """
    semi_axes = anatomy.semi_axes
    q = _ellipsoid_radius(points, np.zeros(3), semi_axes)
    width = EDGE_MM / semi_axes.mean()
    texture, folds = _field(points, _waves(rng, 8, (6, 20))), _field(points, _waves(rng, 6, (8, 14)))
    values = np.zeros(q.shape)
    for edge, level in ((1.0, SCALP), (0.94, SKULL), (0.87, CSF), (BRAIN_EDGE, GREY)):
        values += (level - values) * _inside(q, edge, width)
    values += (CSF - values) * _inside(0.55 - folds, 0.0, 0.08) * _inside(q, BRAIN_EDGE, width)  # sulci: CSF in the cortex
    values += (WHITE - values) * _inside(q + 0.05 * folds, 0.62, width)
    for _ in range(rng.integers(2, 5)):
        centre = rng.uniform(-0.45, 0.45, 3) * semi_axes
        radii = rng.uniform(3, 8, 3)
        level = rng.choice([0.3, 0.38, 0.55])
        values += (level - values) * _inside(_ellipsoid_radius(points, centre, radii), 1.0, EDGE_MM / radii.mean())
    for centre, radii in zip(anatomy.ventricle_centres, anatomy.ventricle_radii):
        values += (CSF - values) * _inside(_ellipsoid_radius(points, centre, radii), 1.0, EDGE_MM / radii.mean())
    values *= 1 + 0.1 * texture
    bias = _waves(rng, 1, (150, 250))
    gradient = rng.normal(size=3) * 0.0006
    values *= np.clip(1 + rng.uniform(0.05, 0.2) * _field(points, bias)
                      + np.einsum("i,izyx->zyx", gradient, points), 0.5, None)
    sigma = rng.uniform(0.015, 0.04)
    real = values + sigma * rng.standard_normal(values.shape)
    imaginary = sigma * rng.standard_normal(values.shape)
    return np.sqrt(real ** 2 + imaginary ** 2), q <= 1.0


def to_pixel_type(values: np.ndarray, pixel_type: type, rng: np.random.Generator) -> np.ndarray:
    """Scale [0, ~1.2] intensities into a pixel-type-typical random range (scanners differ wildly)."""
    if pixel_type is np.float32:
        return (values * rng.uniform(0.5, 400)).astype(np.float32)
    if pixel_type is np.int16:
        return np.clip(np.round(values * rng.uniform(300, 2000) + rng.uniform(-100, 100)), -32768, 32767
                       ).astype(np.int16)
    return np.clip(np.round(values * rng.uniform(800, 4000)), 0, 65535).astype(np.uint16)


def _stream(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, kind, index])


def unlabeled_volume(seed: int, index: int) -> Tuple[sitk.Image, sitk.Image, str]:
    """Volume ``index`` of the unlabeled set: (image, head mask, file extension)."""
    rng = _stream(seed, UNLABELED_STREAM, index)
    direction = ORIENTATIONS[index % len(ORIENTATIONS)]
    spacing = np.clip(np.asarray(SPACINGS[index % len(SPACINGS)]) * rng.uniform(0.95, 1.05, 3), 0.8, 2.5)
    semi_axes = np.array([rng.uniform(27, 35), rng.uniform(31, 40), rng.uniform(28, 36)])  # left-right, AP, SI
    # the head's half extent along each grid axis, plus a margin: field of view 62..96 mm
    half_extent = np.sqrt(((semi_axes[:, None] * direction) ** 2).sum(axis=0)) + rng.uniform(4, 8, 3)
    size = np.ceil(2 * half_extent / spacing).astype(int)
    centre = rng.uniform(-20, 20, 3)
    grid = centred_grid(size, spacing, direction, centre + rng.uniform(-3, 3, 3))
    anatomy = HeadAnatomy.draw(semi_axes, rng)
    values, head = render_head(grid.world_coordinates() - centre[:, None, None, None], anatomy, rng)
    pixel_type = PIXEL_TYPES[(index + index // 3) % len(PIXEL_TYPES)]
    return (grid.image(to_pixel_type(values, pixel_type, rng)), grid.image(head.astype(np.uint8)),
            FORMATS[index % len(FORMATS)])


def labeled_case(seed: int, index: int, stream: int = LABELED_STREAM) -> Tuple[sitk.Image, sitk.Image]:
    """Case ``index`` of the labeled set (``TEST_STREAM``: of the test set): (image, label with 1 = the lateral
    ventricles)."""
    rng = _stream(seed, stream, index)
    size = rng.integers(64, 97, 3)
    spacing = rng.uniform(0.9, 1.2, 3)
    direction = np.eye(3) if index % 2 == 0 else np.diag([-1.0, -1.0, 1.0])
    semi_axes = size * spacing / 2 - rng.uniform(3, 6, 3)
    anatomy = HeadAnatomy.draw(semi_axes, rng)
    grid = centred_grid(size, spacing, direction, np.zeros(3))
    points = grid.world_coordinates()
    values, _ = render_head(points, anatomy, rng)
    return grid.image(to_pixel_type(values, np.uint16, rng)), grid.image(anatomy.ventricles(points).astype(np.uint8))


def write_unlabeled(output_folder: Path, count: int, seed: int) -> List[Path]:
    """Write ``count`` unlabeled volumes (and masks for every other one); returns the image paths."""
    images, masks = output_folder / UNLABELED_FOLDER, output_folder / ANATOMY_MASK_FOLDER
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image, mask, extension = unlabeled_volume(seed, index)
        name = f"head_{index:03d}{extension}"
        sitk.WriteImage(image, str(images / name), True)
        if index % 2 == 0:
            sitk.WriteImage(mask, str(masks / name), True)
        paths.append(images / name)
    return paths


def write_cases(images: Path, labels: Path, prefix: str, count: int, seed: int, stream: int) -> None:
    """Write cases ``{prefix}_000`` ... as nnU-Net image/label pairs; earlier, larger demos' extra cases of this
    prefix in these (demo-only) folders are removed, so the folders hold exactly these cases."""
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    cases = [f"{prefix}_{index:03d}" for index in range(count)]
    for folder in (images, labels):
        for stale in folder.iterdir():
            match = re.fullmatch(rf"({prefix}_\d{{3}})(_0000)?\.nii\.gz", stale.name)
            if match and match.group(1) not in cases:
                stale.unlink()
    for index, case in enumerate(cases):
        image, label = labeled_case(seed, index, stream)
        sitk.WriteImage(image, str(images / f"{case}_0000.nii.gz"), True)
        sitk.WriteImage(label, str(labels / f"{case}.nii.gz"), True)


def write_labeled_dataset(dataset_folder: Path, count: int, seed: int, num_test: int = 0) -> Path:
    """Write the labeled nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) into ``dataset_folder``, and
    ``num_test`` held-out cases into imagesTs/labelsTs (drawn from a stream of their own: the training cases do not
    depend on ``num_test``)."""
    write_cases(dataset_folder / "imagesTr", dataset_folder / "labelsTr", "demo", count, seed, LABELED_STREAM)
    if num_test:
        write_cases(dataset_folder / "imagesTs", dataset_folder / "labelsTs", "demo_test", num_test, seed,
                    TEST_STREAM)
    (dataset_folder / "dataset.json").write_text(json.dumps({
        "name": LABELED_NAME,
        "description": "nnssl synthetic demo: segment the lateral ventricles of a synthetic head MRI",
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "ventricles": 1},
        "numTraining": count,
        "file_ending": ".nii.gz",
    }, indent=2) + "\n")
    return dataset_folder


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``nnssl_demo_data``."""
    parser = argparse.ArgumentParser(prog="nnssl_demo_data", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", dest="output", required=True, metavar="DIR",
                        help="output folder for the unlabeled images (DIR/unlabeled, DIR/unlabeled_masks/anatomy)")
    parser.add_argument("--num_unlabeled", type=int, default=8, metavar="N",
                        help="unlabeled volumes (default: %(default)s)")
    parser.add_argument("--num_labeled", type=int, default=6, metavar="N",
                        help="cases of the labeled dataset, 0 = none (default: %(default)s)")
    parser.add_argument("--num_test", type=int, default=0, metavar="N",
                        help="held-out cases of the labeled dataset in imagesTs/labelsTs, for nnUNetv2_predict "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED", help="random seed; same seed, same data (default: 0)")
    parser.add_argument("-d", dest="dataset_id", type=int, default=DEFAULT_LABELED_ID, metavar="LABELED_DATASET_ID",
                        help=f"nnU-Net ID of the labeled dataset, written to $nnUNet_raw/Dataset<ID>_{LABELED_NAME} "
                             f"(default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.num_unlabeled, args.num_labeled, args.num_test) < 0:
        parser.error("--num_unlabeled, --num_labeled and --num_test must not be negative")
    if args.num_test and not args.num_labeled:
        parser.error("--num_test cases belong to the labeled dataset: give --num_labeled too")

    from nnssl.integration.user_errors import run_user_command

    return run_user_command("nnssl_demo_data", lambda: write_demo_data(args), kept=lambda: (
        f"The volumes written so far stay in {args.output} (and nnUNet_raw); rerun the same command to write them "
        f"all (the same seed gives the same data)."))


def write_demo_data(args: argparse.Namespace) -> int:
    from nnssl.ingest.datasets import resolve_dataset_folder

    # before generating anything: a missing nnUNet_raw should fail fast
    dataset_folder = resolve_dataset_folder(args.dataset_id, LABELED_NAME) if args.num_labeled else None
    output = Path(args.output)
    paths = write_unlabeled(output, args.num_unlabeled, args.seed)
    print(f"{len(paths)} unlabeled volumes in {output / UNLABELED_FOLDER}, "
          f"anatomy masks in {output / ANATOMY_MASK_FOLDER}")
    if dataset_folder is not None:
        write_labeled_dataset(dataset_folder, args.num_labeled, args.seed, args.num_test)
        print(f"{args.num_labeled} labeled cases in {dataset_folder}"
              + (f", {args.num_test} test cases in its imagesTs/labelsTs" if args.num_test else ""))
    print(f"next: nnssl_ingest -i {output / UNLABELED_FOLDER} --anatomy_masks {output / ANATOMY_MASK_FOLDER} "
          f"-d 501 -n DemoUnlabeled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
