"""The dataset's bookkeeping: ``nnssl_ingest_summary.json`` (what was accepted from where, what was rejected or
excluded and why, what was corrected, size + mtime of every source for skipping unchanged work on re-runs),
``nnssl_case_metadata.json`` (subject, session, modality and quality score per case, from ``--metadata``) and
nnU-Net's ``dataset.json``."""

import json
import os
from typing import Dict, List, Optional

from nnssl.ingest.discover import Source
from nnssl.ingest.write_case import CHANNEL_SUFFIX, FILE_ENDING, image_path, label_path

SUMMARY_FILE = "nnssl_ingest_summary.json"
CASE_METADATA_FILE = "nnssl_case_metadata.json"
LABEL_SEMANTICS = ("1 = anatomy (whole image where no anatomy mask was given), 2 = anonymised; "
                   "placeholder labels for nnU-Net, not a segmentation")
MASK_KEYS = ("anatomy_mask", "anonymization_mask")

Stamp = Optional[List[int]]


def file_stamp(path: Optional[str]) -> Stamp:
    """``[size, mtime_ns]`` of a file, summed/maxed with the data file of a detached MetaImage header (.mhd)."""
    if path is None or not os.path.isfile(path):
        return None
    files = [path]
    if path.lower().endswith(".mhd"):
        with open(path, "r", errors="replace") as header:
            for line in header:
                key, _, value = line.partition("=")
                data_file = os.path.join(os.path.dirname(path), value.strip())
                if key.strip() == "ElementDataFile" and os.path.isfile(data_file):
                    files.append(data_file)
    stats = [os.stat(f) for f in files]
    return [sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]


def manifest_entry(source: Source) -> dict:
    """What the summary records for an accepted case: its source paths and their stamps at ingest time."""
    paths = {"image": source.image, "anatomy_mask": source.anatomy_mask,
             "anonymization_mask": source.anonymization_mask}
    return dict(paths, stamps={key: file_stamp(path) for key, path in paths.items()})


def is_unchanged(previous: Optional[dict], current: dict, dataset_folder: str, case_id: str) -> bool:
    """True when the case's files exist and were made from the same, unmodified source and mask files."""
    return (previous == current
            and os.path.isfile(image_path(dataset_folder, case_id))
            and os.path.isfile(label_path(dataset_folder, case_id)))


def load_summary(dataset_folder: str) -> dict:
    """The previous run's summary (``accepted`` / ``rejected`` / ``excluded`` / ``corrected``), or an empty one."""
    path = os.path.join(dataset_folder, SUMMARY_FILE)
    summary = {"accepted": {}, "rejected": {}, "excluded": {}, "corrected": {}}
    if os.path.isfile(path):
        with open(path) as file:
            stored = json.load(file)
        summary.update({key: stored.get(key, {}) for key in summary})
    return summary


def write_json_atomically(content: dict, path: str) -> None:
    """Write JSON through a temp file in the same folder and ``os.replace``, so readers never see half a file."""
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w") as file:
        json.dump(content, file, indent=2)
        file.write("\n")
    os.replace(temp, path)


def count_cases(dataset_folder: str) -> int:
    """Number of case identifiers in imagesTr, counted the way nnU-Net does."""
    images = os.path.join(dataset_folder, "imagesTr")
    suffix = CHANNEL_SUFFIX + FILE_ENDING
    return len({name[:-len(suffix)] for name in os.listdir(images) if name.endswith(FILE_ENDING)})


def write_dataset_json(dataset_folder: str, name: str, modality: str, accepted: Dict[str, dict]) -> int:
    """(Re)write dataset.json for the cases now in imagesTr; returns ``numTraining``."""
    anatomy_masks = any(entry.get("anatomy_mask") for entry in accepted.values())
    anonymization_masks = any(entry.get("anonymization_mask") for entry in accepted.values())
    labels = {"background": 0, "anatomy": 1}
    if anonymization_masks:
        labels["anonymised"] = 2
    num_training = count_cases(dataset_folder)
    write_json_atomically({
        "name": name,
        "channel_names": {"0": modality},
        "labels": labels,
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "nnssl": {"unlabeled": True, "label_semantics": LABEL_SEMANTICS, "anatomy_masks": anatomy_masks,
                  "anonymization_masks": anonymization_masks},
    }, os.path.join(dataset_folder, "dataset.json"))
    return num_training


def write_summary(dataset_folder: str, name: str, accepted: Dict[str, dict], rejected: Dict[str, str],
                  excluded: Dict[str, str], corrected: Dict[str, str], last_run: Dict[str, int],
                  metadata: Optional[dict] = None) -> str:
    """Write ``nnssl_ingest_summary.json`` (``excluded``: image -> why ``--metadata`` / the filters / the exclude
    list left it out; ``corrected``: case -> what ``--fix_bad_spacing`` changed; ``metadata``: the last run's table
    and its rows without image); returns its path."""
    path = os.path.join(dataset_folder, SUMMARY_FILE)
    content = {"dataset": name, "last_run": last_run, "accepted": dict(sorted(accepted.items())),
               "rejected": dict(sorted(rejected.items())), "excluded": dict(sorted(excluded.items())),
               "corrected": dict(sorted(corrected.items()))}
    if metadata is not None:
        content["metadata"] = metadata
    write_json_atomically(content, path)
    return path


def load_case_metadata(dataset_folder: str) -> Dict[str, dict]:
    """The ``cases`` of the dataset's ``nnssl_case_metadata.json`` (case -> subject, session, modality, quality)."""
    path = os.path.join(dataset_folder, CASE_METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file).get("cases", {})


def write_case_metadata(dataset_folder: str, cases: Dict[str, dict]) -> None:
    """Write ``nnssl_case_metadata.json`` for the cases that have metadata; a dataset that never had any gets no
    file. Pretraining reads the subject of each case from it (keys are nnU-Net case identifiers)."""
    path = os.path.join(dataset_folder, CASE_METADATA_FILE)
    if cases or os.path.isfile(path):
        write_json_atomically({"cases": dict(sorted(cases.items()))}, path)
