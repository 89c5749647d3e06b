"""Turning one validated source image into an nnU-Net case (image + placeholder label), atomically.

This is the function the worker processes run, so it never raises: every problem becomes a rejection reason.
"""

import os
from dataclasses import dataclass
from typing import Optional

import SimpleITK as sitk

from nnssl.ingest.discover import Source
from nnssl.ingest.integrity import spacing_problem
from nnssl.ingest.stored_volume import stored_volume
from nnssl.ingest.validate import (Rejected, check_image, geometry_mismatch, itk_message, mask_on_image_grid,
                                   nifti_nonfinite_problem, placeholder_label, read_image)

FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"


@dataclass(frozen=True)
class CaseTask:
    """Everything a worker needs to ingest one source (picklable, for the process pool)."""

    source: Source
    case_id: str
    dataset_folder: str
    temp_folder: str
    min_extent_mm: float
    fix_bad_spacing: bool = False


@dataclass(frozen=True)
class CaseResult:
    """The outcome for one task: ``reason`` is None when the case was written; ``note`` says what was corrected."""

    task: CaseTask
    reason: Optional[str] = None
    note: Optional[str] = None


def image_path(dataset_folder: str, case_id: str) -> str:
    return os.path.join(dataset_folder, "imagesTr", f"{case_id}{CHANNEL_SUFFIX}{FILE_ENDING}")


def label_path(dataset_folder: str, case_id: str) -> str:
    return os.path.join(dataset_folder, "labelsTr", f"{case_id}{FILE_ENDING}")


def process_case(task: CaseTask) -> CaseResult:
    """Validate and write one case; any failure is returned as a rejection so the batch carries on."""
    try:
        note = write_case(task)
    except Rejected as rejection:
        return CaseResult(task, str(rejection))
    except Exception as error:  # a surprise in one file (disk full, an ITK quirk) must not abort the others
        return CaseResult(task, f"failed: {type(error).__name__}: {itk_message(error)}")
    return CaseResult(task, note=note)


def write_case(task: CaseTask) -> Optional[str]:
    """Write ``imagesTr/{case}_0000.nii.gz`` and ``labelsTr/{case}.nii.gz`` for a valid source, or raise Rejected;
    returns what was corrected (a bad header spacing under ``--fix_bad_spacing``), or None.

    ``task.dataset_folder`` is the run's staging folder (``staging``), from which finished cases join the dataset.
    The image keeps its voxel values, pixel type and geometry (no resampling, no reorientation). Both files are
    written into ``task.temp_folder`` first and then moved into place with ``os.replace``: nnU-Net lists every
    ``*.nii.gz`` in imagesTr, so a half-written file must never appear there. The label is moved first, so there
    is never an image without label.
    """
    source = task.source
    stored = stored_volume(source.image)
    bad_spacing = spacing_problem(stored) if stored is not None else None
    if bad_spacing and not task.fix_bad_spacing:
        raise Rejected(f"{bad_spacing}. Fix the header, or pass --fix_bad_spacing to ingest it with the spacing "
                       f"ITK reads for it")
    image = read_image(source.image)
    check_image(image, task.min_extent_mm)
    nifti_nonfinite_problem(source.image)
    anatomy = None
    if source.anatomy_mask:
        anatomy = mask_on_image_grid(source.anatomy_mask, image, "anatomy mask")
        if not anatomy.any():
            raise Rejected("anatomy mask is empty")
    anonymised = None
    if source.anonymization_mask:
        anonymised = mask_on_image_grid(source.anonymization_mask, image, "anonymization mask")
    label = sitk.GetImageFromArray(placeholder_label(image.GetSize()[::-1], anatomy, anonymised))
    label.CopyInformation(image)
    for key in image.GetMetaDataKeys():  # source header fields (NRRD keys, NIfTI scaling) must not leak into NIfTI
        image.EraseMetaData(key)

    temp_image = os.path.join(task.temp_folder, os.path.basename(image_path(task.dataset_folder, task.case_id)))
    temp_label = os.path.join(task.temp_folder, "label_" + os.path.basename(label_path(task.dataset_folder,
                                                                                      task.case_id)))
    try:
        sitk.WriteImage(image, temp_image, True)
        reader = sitk.ImageFileReader()
        reader.SetFileName(temp_image)
        reader.ReadImageInformation()
        mismatch = geometry_mismatch(reader, image)
        if mismatch:
            raise Rejected(f"geometry cannot be stored as NIfTI: {mismatch}")
        sitk.WriteImage(label, temp_label, True)
        os.replace(temp_label, label_path(task.dataset_folder, task.case_id))
        os.replace(temp_image, image_path(task.dataset_folder, task.case_id))
    finally:
        for leftover in (temp_image, temp_label):
            if os.path.exists(leftover):
                os.remove(leftover)
    return f"{bad_spacing}; written with ITK's spacing {image.GetSpacing()}" if bad_spacing else None
