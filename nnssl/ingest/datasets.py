"""Where an nnU-Net raw dataset lives, and refusing dataset IDs that nnU-Net would resolve ambiguously."""

import os
import re
from pathlib import Path

from nnssl.ingest.errors import IngestError

RAW_VARIABLE = "nnUNet_raw"
# nnU-Net resolves ``-d ID`` by looking for folders called Dataset{ID}* in all three of its folders
SEARCHED_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def nnunet_raw_folder() -> Path:
    """The folder named by ``nnUNet_raw``; an error that names the variable when it is unset or wrong."""
    value = os.environ.get(RAW_VARIABLE, "").strip()
    if not value:
        raise IngestError(f"The environment variable {RAW_VARIABLE} is not set. nnU-Net (and nnssl) write raw "
                          f"datasets there: export {RAW_VARIABLE}=/path/to/nnUNet_raw")
    folder = Path(value)
    if not folder.is_dir():
        raise IngestError(f"{RAW_VARIABLE}={value} is not an existing folder. Create it or fix the variable.")
    return folder


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{ID:03d}_{NAME}``; IDs above 999 are refused because nnU-Net parses exactly three digits."""
    if not 1 <= dataset_id <= 999:
        raise IngestError(f"Dataset ID {dataset_id} is out of range: nnU-Net dataset IDs are 1..999.")
    if not NAME_PATTERN.fullmatch(name):
        raise IngestError(f"Dataset name {name!r} is not allowed: use letters, digits, '_' and '-' only "
                          f"(it becomes part of a folder name).")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_dataset_folder(dataset_id: int, name: str) -> Path:
    """``$nnUNet_raw/Dataset{ID:03d}_{NAME}`` (not created), after checking that the ID is not taken by another name.

    nnU-Net finds a dataset from its ID alone, so a second name under the same ID would make every later
    ``-d ID`` command fail ("more than one dataset name found") or pick the wrong data.
    """
    raw = nnunet_raw_folder()
    folder_name = dataset_folder_name(dataset_id, name)
    prefix = f"Dataset{dataset_id:03d}"
    for variable in SEARCHED_VARIABLES:
        root = os.environ.get(variable, "").strip()
        if not root or not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            if entry.startswith(prefix) and entry != folder_name and os.path.isdir(os.path.join(root, entry)):
                raise IngestError(f"Dataset ID {dataset_id} is already used by {os.path.join(root, entry)} "
                                  f"(in {variable}), so it cannot also be {folder_name}. Pick another ID with -d, "
                                  f"or reuse the existing name with -n.")
    return raw / folder_name
