"""``ingest``: unlabeled 3D images -> ``$nnUNet_raw/Dataset{ID:03d}_{NAME}``, resumable and in parallel."""

import glob
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from tqdm import tqdm

from nnssl import processes
from nnssl.ingest.datasets import resolve_dataset_folder
from nnssl.ingest.discover import IMAGE_EXTENSIONS, PathLike, case_identifier, discover
from nnssl.ingest.errors import IngestError
from nnssl.ingest.summary import (SUMMARY_FILE, is_unchanged, load_summary, manifest_entry, write_dataset_json,
                                  write_summary)
from nnssl.ingest.write_case import CaseResult, CaseTask, image_path, label_path, process_case

TEMP_PREFIX = ".nnssl_ingest_tmp_"
MAX_DEFAULT_PROCESSES = 8


def default_num_processes() -> int:
    """min(8, CPU count): reading and gzip-writing volumes is CPU bound, more workers mostly cost memory."""
    return processes.default_num_processes(MAX_DEFAULT_PROCESSES)


@dataclass
class IngestReport:
    """What one ingest run did. ``rejected`` covers this run's inputs only (source path -> reason)."""

    dataset_folder: Path
    summary_file: Path
    num_cases: int
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    rejected: Dict[str, str] = field(default_factory=dict)

    def describe(self, max_listed: int = 10) -> str:
        """The short end-of-run summary printed by ``nnssl_ingest``."""
        lines = [f"nnssl_ingest: {len(self.written) + len(self.skipped)} accepted ({len(self.written)} written, "
                 f"{len(self.skipped)} unchanged and skipped), {len(self.rejected)} rejected. "
                 f"{self.dataset_folder.name} now has {self.num_cases} cases."]
        for path, reason in list(self.rejected.items())[:max_listed]:
            lines.append(f"  rejected {path}: {reason}")
        if len(self.rejected) > max_listed:
            lines.append(f"  ... and {len(self.rejected) - max_listed} more")
        lines.append(f"Details: {self.summary_file}")
        return "\n".join(lines)


def run_tasks(tasks: Sequence[CaseTask], num_processes: int, progress: bool) -> Iterator[CaseResult]:
    """Results of ``process_case`` as they finish, in a spawn pool when more than one process is useful.

    Spawn rather than fork: SimpleITK/ITK keep internal thread pools that are not fork-safe.
    """
    bar = dict(total=len(tasks), desc="nnssl_ingest", unit="image", disable=not progress)
    if num_processes <= 1 or len(tasks) <= 1:
        yield from tqdm(map(process_case, tasks), **bar)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
        yield from tqdm(pool.imap_unordered(process_case, tasks), **bar)


def remove_case(dataset_folder: str, case_id: str) -> None:
    """Delete a case nnssl wrote earlier (image first, so an image never exists without its label)."""
    for path in (image_path(dataset_folder, case_id), label_path(dataset_folder, case_id)):
        if os.path.exists(path):
            os.remove(path)


def ingest(dataset_id: int, dataset_name: str, input_dirs: Sequence[PathLike] = (),
           list_file: Optional[PathLike] = None, anatomy_masks: Optional[PathLike] = None,
           anonymization_masks: Optional[PathLike] = None, num_processes: Optional[int] = None,
           modality: str = "MRI", min_extent_mm: float = 16.0, verbose: bool = False,
           progress: bool = True) -> IngestReport:
    """Ingest every image of ``input_dirs`` / ``list_file`` into the nnU-Net raw dataset ``dataset_id``.

    Invalid images are rejected with a reason (never aborting the batch); cases already written from unchanged
    sources are skipped; dataset.json and ``nnssl_ingest_summary.json`` are rewritten at the end (also when the
    run is interrupted), so a re-run resumes. Source files are only ever read. Raises ``IngestError`` for
    problems with the command itself (environment, dataset ID, missing inputs). Run one ingest per dataset at a
    time: a run removes temp folders that an earlier, killed run left behind.
    """
    if not input_dirs and list_file is None:
        raise IngestError("No inputs: give input folders with -i and/or a list file with -l.")
    dataset_folder = resolve_dataset_folder(dataset_id, dataset_name)
    found = discover(input_dirs, list_file, anatomy_masks, anonymization_masks, excluded=[dataset_folder])
    if not found.sources and not found.rejected:
        searched = [str(p) for p in input_dirs] + ([str(list_file)] if list_file is not None else [])
        raise IngestError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(searched)}.")
    folder = str(dataset_folder)
    for subfolder in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
    for stale in glob.glob(os.path.join(folder, TEMP_PREFIX + "*")):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)

    previous = load_summary(folder)
    accepted: Dict[str, dict] = previous["accepted"]
    rejected: Dict[str, str] = previous["rejected"]
    report = IngestReport(dataset_folder, Path(folder) / SUMMARY_FILE, 0)

    def reject(image: str, reason: str) -> None:
        case_id = case_identifier(image)
        if case_id in accepted:  # its source turned into something invalid: drop the stale case
            remove_case(folder, case_id)
            del accepted[case_id]
        rejected[image] = report.rejected[image] = reason

    temp_folder = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        for image, reason in found.rejected.items():
            reject(image, reason)
        tasks, entries = [], {}
        for source in found.sources:
            case_id = case_identifier(source.image)
            entries[case_id] = manifest_entry(source)  # stamped before reading: a later edit is seen as a change
            if is_unchanged(accepted.get(case_id), entries[case_id], folder, case_id):
                report.skipped.append(case_id)
                rejected.pop(source.image, None)
                if verbose:
                    print(f"unchanged, skipped: {case_id} <- {source.image}")
            else:
                tasks.append(CaseTask(source, case_id, folder, temp_folder, min_extent_mm))
        for result in run_tasks(tasks, num_processes or default_num_processes(), progress):
            case_id, source = result.task.case_id, result.task.source
            if result.reason is None:
                accepted[case_id] = entries[case_id]
                rejected.pop(source.image, None)
                report.written.append(case_id)
                message = f"written: {case_id} <- {source.image}"
            else:
                reject(source.image, result.reason)
                message = f"rejected: {source.image}: {result.reason}"
            if verbose:
                tqdm.write(message)
    finally:
        shutil.rmtree(temp_folder, ignore_errors=True)
        accepted = {case_id: entry for case_id, entry in accepted.items()
                    if os.path.isfile(image_path(folder, case_id))}
        report.num_cases = write_dataset_json(folder, dataset_folder.name, modality, accepted)
        write_summary(folder, accepted, rejected, {"written": len(report.written), "skipped": len(report.skipped),
                                                   "rejected": len(report.rejected)})
    return report
