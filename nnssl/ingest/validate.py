"""Deciding whether one image (and its masks) is something nnU-Net can preprocess and train on.

Every check raises ``Rejected`` with a short reason that starts with a stable phrase ("unreadable", "truncated",
"corrupt", "invalid spacing", "not 3D", "not a scalar image", "NaN voxels", "infinite voxels", "constant image",
"too small", "anatomy mask ...", "anonymization mask ..."), because the reason is what the user reads in the
summary.
"""

import os
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from nnssl.ingest.integrity import incomplete_file_problem

# Masks written by other tools (or stored as NIfTI's float32 header) differ from the image by rounding only;
# anything larger than this is a different grid.
SPACING_RELATIVE_TOLERANCE = 1e-4
DIRECTION_TOLERANCE = 1e-4
ORIGIN_TOLERANCE_IN_VOXELS = 1e-2

Geometry = Union[sitk.Image, sitk.ImageFileReader]


class Rejected(Exception):
    """An input nnssl will not ingest; ``str(rejection)`` is the reason recorded in the summary."""


def itk_message(error: BaseException) -> str:
    """The informative line of a (multi-line) SimpleITK exception, without the C++ source location."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__


def read_image(path: str, what: str = "") -> sitk.Image:
    """The image at ``path``; ``what`` ("anatomy mask", ...) prefixes the reason when it cannot be read."""
    prefix = f"{what} " if what else ""
    if not os.path.isfile(path):
        raise Rejected(f"{prefix}unreadable: file not found ({path})")
    problem = incomplete_file_problem(path)  # before ITK, which zero-fills what a truncated NIfTI lacks
    if problem:
        raise Rejected(f"{prefix}{problem}")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as error:
        raise Rejected(f"{prefix}unreadable: {itk_message(error)}") from None


def scalar_3d_problem(image: sitk.Image) -> Optional[str]:
    """Why ``image`` is not a single-channel 3D volume, or None when it is."""
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        return f"not a scalar image: {components} components per voxel ({image.GetPixelIDTypeAsString()})"
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        return "not a scalar image: complex-valued voxels"
    if image.GetDimension() != 3:
        return f"not 3D: {image.GetDimension()}D image of size {image.GetSize()}"
    return None


def geometry_mismatch(actual: Geometry, expected: Geometry) -> Optional[str]:
    """Which of spacing / origin / direction of ``actual`` differs from ``expected`` beyond rounding, or None."""
    spacing = np.array(expected.GetSpacing())
    if not np.allclose(actual.GetSpacing(), spacing, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
        return f"spacing {actual.GetSpacing()} instead of {expected.GetSpacing()}"
    if not np.allclose(actual.GetOrigin(), expected.GetOrigin(), rtol=0,
                       atol=ORIGIN_TOLERANCE_IN_VOXELS * spacing.min()):
        return f"origin {actual.GetOrigin()} instead of {expected.GetOrigin()}"
    if not np.allclose(actual.GetDirection(), expected.GetDirection(), rtol=0, atol=DIRECTION_TOLERANCE):
        return f"direction {actual.GetDirection()} instead of {expected.GetDirection()}"
    return None


def check_image(image: sitk.Image, min_extent_mm: float) -> None:
    """Reject images nnU-Net cannot use: not 3D scalar, smaller than ``min_extent_mm``, NaN/inf, or constant.

    The physical extent along an axis is its number of voxels times its spacing (the field of view). ITK's NIfTI
    reader silently turns NaN/inf into 0, so NIfTI files are checked separately (``nifti_nonfinite_problem``).
    """
    problem = scalar_3d_problem(image)
    if problem:
        raise Rejected(problem)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    if np.any(extent < min_extent_mm):
        raise Rejected(f"too small: physical extent {' x '.join(f'{e:.1f}' for e in extent)} mm is below "
                       f"the minimum of {min_extent_mm:g} mm along at least one axis")
    values = sitk.GetArrayViewFromImage(image)
    reason = nonfinite_reason(values)
    if reason:
        raise Rejected(reason)
    low, high = values.min(), values.max()
    if low == high:
        raise Rejected(f"constant image: every voxel is {low.item()!r}")


def nonfinite_reason(values: np.ndarray) -> Optional[str]:
    """Why ``values`` are not all finite, or None."""
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return None
    nan = int(np.isnan(values).sum())
    if nan:
        return f"NaN voxels: {nan} of {values.size} voxels are NaN"
    return f"infinite voxels: {int(np.isinf(values).sum())} of {values.size} voxels are +-inf"


def nifti_nonfinite_problem(path: str) -> None:
    """Reject NIfTI files holding NaN/inf, which ITK (and so nnU-Net) would silently read as 0."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel

    try:
        proxy = nibabel.load(path).dataobj
        if np.dtype(proxy.dtype).kind != "f" and not getattr(proxy, "_has_scaling", False):
            return  # integer voxels without scaling cannot be NaN or inf
        reason = nonfinite_reason(np.asanyarray(proxy))
    except Exception:  # nibabel cannot read it: ITK already did, so leave the decision to the other checks
        return
    if reason:
        raise Rejected(reason)


def mask_on_image_grid(path: str, image: sitk.Image, what: str) -> np.ndarray:
    """``mask > 0`` as a boolean array, after checking that the mask lies on the image's voxel grid."""
    mask = read_image(path, what)
    problem = scalar_3d_problem(mask)
    if problem:
        raise Rejected(f"{what} is {problem}")
    if mask.GetSize() != image.GetSize():
        raise Rejected(f"{what} size {mask.GetSize()} differs from image size {image.GetSize()}")
    mismatch = geometry_mismatch(mask, image)
    if mismatch:
        raise Rejected(f"{what} geometry differs from the image: {mismatch}")
    return sitk.GetArrayViewFromImage(mask) > 0


def placeholder_label(shape: tuple, anatomy: Optional[np.ndarray], anonymised: Optional[np.ndarray]) -> np.ndarray:
    """The uint8 label map nnU-Net needs: 1 = anatomy (everything without a mask), 0 = outside it, 2 = anonymised.

    nnU-Net requires a label per case and its fingerprint extraction fails on all-zero maps, so unlabeled images
    get this placeholder; the anonymised label overrides the others.
    """
    label = np.ones(shape, dtype=np.uint8) if anatomy is None else anatomy.astype(np.uint8)
    if anonymised is not None:
        label[anonymised] = 2
    return label
