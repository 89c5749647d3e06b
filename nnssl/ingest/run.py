"""``ingest``: unlabeled 3D images -> ``$nnUNet_raw/Dataset{ID:03d}_{NAME}``, resumable, in parallel, and atomic
per dataset (``staging``)."""

import multiprocessing
import os
import signal
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from tqdm import tqdm

from nnssl import processes
from nnssl.ingest.datasets import resolve_dataset_folder
from nnssl.ingest.discover import IMAGE_EXTENSIONS, PathLike, discover
from nnssl.ingest.errors import IngestError
from nnssl.ingest.metadata import MetadataOptions, Selection, select
from nnssl.ingest.staging import DatasetStaging
from nnssl.ingest.summary import (SUMMARY_FILE, is_unchanged, load_case_metadata, load_summary, manifest_entry,
                                  write_case_metadata, write_dataset_json, write_summary)
from nnssl.ingest.write_case import CaseResult, CaseTask, image_path, process_case

MAX_DEFAULT_PROCESSES = 8
# finished cases join the dataset in groups of this size, so a killed run loses at most one group's work
PUBLISH_EVERY = 50


def default_num_processes() -> int:
    """min(8, CPU count): reading and gzip-writing volumes is CPU bound, more workers mostly cost memory."""
    return processes.default_num_processes(MAX_DEFAULT_PROCESSES)


@dataclass
class IngestReport:
    """What one ingest run did. ``rejected`` and ``excluded`` cover this run's inputs only (source path -> reason),
    ``corrected`` this run's corrections (case -> what was changed). ``summary_file`` is None when no dataset was
    written."""

    dataset_folder: Path
    summary_file: Optional[Path]
    num_cases: int
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    rejected: Dict[str, str] = field(default_factory=dict)
    corrected: Dict[str, str] = field(default_factory=dict)
    excluded: Dict[str, str] = field(default_factory=dict)

    def describe(self, max_listed: int = 10) -> str:
        """The short end-of-run summary printed by ``nnssl_ingest``; every rejection when no dataset was written
        (there is no summary file to look them up in)."""
        max_listed = max_listed if self.summary_file is not None else len(self.rejected)
        lines = [f"nnssl_ingest: {len(self.written) + len(self.skipped)} accepted ({len(self.written)} written, "
                 f"{len(self.skipped)} unchanged and skipped), {len(self.rejected)} rejected. "
                 + (f"{self.dataset_folder.name} now has {self.num_cases} cases." if self.summary_file is not None
                    else f"{self.dataset_folder.name} was not created.")]
        for path, reason in list(self.rejected.items())[:max_listed]:
            lines.append(f"  rejected {path}: {reason}")
        if len(self.rejected) > max_listed:
            lines.append(f"  ... and {len(self.rejected) - max_listed} more")
        if self.excluded:
            lines.append(f"  {len(self.excluded)} excluded by --metadata, its filters or --exclude_list"
                         + (" (reasons in the summary)" if self.summary_file is not None else ":"))
        if self.summary_file is None:
            lines.extend(f"  excluded {path}: {reason}" for path, reason in self.excluded.items())
        for case_id, note in self.corrected.items():
            lines.append(f"  corrected {case_id}: {note}")
        if self.summary_file is not None:
            lines.append(f"Details: {self.summary_file}")
        return "\n".join(lines)

    def kept(self) -> str:
        """What the dataset holds after the run stopped early (said when the user pressed Ctrl-C)."""
        if self.summary_file is None:
            return f"{self.dataset_folder.name} was not created; rerun the same command to ingest the images."
        return (f"{self.dataset_folder.name} keeps its {self.num_cases} complete cases (dataset.json and "
                f"{SUMMARY_FILE} match them); rerun the same command to ingest the rest.")


def run_tasks(tasks: Sequence[CaseTask], num_processes: int, progress: bool) -> Iterator[CaseResult]:
    """Results of ``process_case`` as they finish, in a spawn pool when more than one process is useful.

    Spawn rather than fork: SimpleITK/ITK keep internal thread pools that are not fork-safe.
    """
    bar = dict(total=len(tasks), desc="nnssl_ingest", unit="image", disable=not progress)
    if num_processes <= 1 or len(tasks) <= 1:
        yield from tqdm(map(process_case, tasks), **bar)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks)), _ignore_interrupts) as pool:
        yield from tqdm(pool.imap_unordered(process_case, tasks), **bar)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the main process, which stops them and reports once (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cases_from(accepted: Dict[str, dict], image: str) -> List[str]:
    """The cases the dataset holds from the source ``image``."""
    return [case_id for case_id, entry in accepted.items() if entry.get("image") == image]


def ingest(dataset_id: int, dataset_name: str, input_dirs: Sequence[PathLike] = (),
           list_file: Optional[PathLike] = None, anatomy_masks: Optional[PathLike] = None,
           anonymization_masks: Optional[PathLike] = None, num_processes: Optional[int] = None,
           channel_name: str = "MRI", min_extent_mm: float = 16.0, verbose: bool = False,
           progress: bool = True, fix_bad_spacing: bool = False,
           metadata: Optional[MetadataOptions] = None) -> IngestReport:
    """Ingest every image of ``input_dirs`` / ``list_file`` into the nnU-Net raw dataset ``dataset_id``.

    Invalid images are rejected with a reason (never aborting the batch); cases already written from unchanged
    sources are skipped. Cases join the dataset together with dataset.json and ``nnssl_ingest_summary.json``
    (``staging``): every ``PUBLISH_EVERY`` cases and at the end, also when the run is interrupted, so a re-run
    resumes; a killed run leaves the last consistent state and no dataset folder without cases. Source files are
    only ever read. ``metadata`` selects images and attaches subject, session, modality and quality score to each
    case (``nnssl.ingest.metadata``); excluded images are recorded with their reason and never written. Raises
    ``IngestError`` for problems with the command itself (environment, dataset ID, missing
    inputs, folders it cannot write). Run one ingest per dataset at a time: a run removes the staging folders that
    an earlier, killed run left behind.
    """
    if not input_dirs and list_file is None:
        raise IngestError("No inputs: give input folders with -i and/or a list file with -l.")
    dataset_folder = resolve_dataset_folder(dataset_id, dataset_name)
    found = discover(input_dirs, list_file, anatomy_masks, anonymization_masks, excluded=[dataset_folder])
    if not found.sources and not found.rejected:
        searched = [str(p) for p in input_dirs] + ([str(list_file)] if list_file is not None else [])
        raise IngestError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(searched)}.")
    selection = select(found.sources, found.roots, metadata) if metadata is not None else Selection()
    previous = load_summary(str(dataset_folder))
    accepted: Dict[str, dict] = previous["accepted"]
    rejected: Dict[str, str] = previous["rejected"]
    excluded: Dict[str, str] = previous["excluded"]
    corrected: Dict[str, str] = previous["corrected"]
    case_metadata = load_case_metadata(str(dataset_folder))
    report = IngestReport(dataset_folder, None, 0)
    staging = DatasetStaging(dataset_folder)

    def drop(case_id: str) -> None:  # the dataset loses the case at the next publication
        staging.removed.append(case_id)
        del accepted[case_id]
        corrected.pop(case_id, None)
        case_metadata.pop(case_id, None)

    def reject(image: str, reason: str) -> None:
        for case_id in cases_from(accepted, image):  # its source turned into something invalid: drop the stale case
            drop(case_id)
        excluded.pop(image, None)
        rejected[image] = report.rejected[image] = reason

    def exclude(image: str, reason: str) -> None:
        for case_id in cases_from(accepted, image):  # a stricter selection than before: the case leaves
            drop(case_id)
        rejected.pop(image, None)
        excluded[image] = report.excluded[image] = reason

    def write_bookkeeping(folder: str) -> None:
        present = {case_id: entry for case_id, entry in accepted.items()
                   if os.path.isfile(image_path(folder, case_id))}
        report.num_cases = write_dataset_json(folder, dataset_folder.name, channel_name, present)
        write_summary(folder, dataset_folder.name, present, rejected, excluded,
                      {case_id: note for case_id, note in corrected.items() if case_id in present},
                      {"written": len(report.written), "skipped": len(report.skipped),
                       "rejected": len(report.rejected), "excluded": len(report.excluded)},
                      selection.report(metadata) if metadata is not None else None)
        write_case_metadata(folder, {case_id: entry for case_id, entry in case_metadata.items()
                                     if case_id in present})
        report.summary_file = dataset_folder / SUMMARY_FILE

    interrupted = False
    try:
        for image, reason in found.rejected.items():
            reject(image, reason)
        tasks, entries = [], {}
        for source in found.sources:
            if source.image in selection.excluded:
                exclude(source.image, selection.excluded[source.image])
                continue
            excluded.pop(source.image, None)
            case_id = source.case_id
            if source.image in selection.metadata:  # kept until the case is written or dropped
                case_metadata[case_id] = selection.metadata[source.image]
            for renamed in set(cases_from(accepted, source.image)) - {case_id}:  # named by an older nnssl
                drop(renamed)
            entries[case_id] = manifest_entry(source)  # stamped before reading: a later edit is seen as a change
            if is_unchanged(accepted.get(case_id), entries[case_id], str(dataset_folder), case_id):
                report.skipped.append(case_id)
                rejected.pop(source.image, None)
                if verbose:
                    print(f"unchanged, skipped: {case_id} <- {source.image}")
            else:
                tasks.append(CaseTask(source, case_id, staging.folder, staging.folder, min_extent_mm,
                                      fix_bad_spacing))
        # closed on any exception: the workers stop before the staging folder is published and deleted
        with closing(run_tasks(tasks, num_processes or default_num_processes(), progress)) as results:
            for result in results:
                case_id, source = result.task.case_id, result.task.source
                if result.reason is None:
                    accepted[case_id] = entries[case_id]
                    rejected.pop(source.image, None)
                    report.written.append(case_id)
                    staging.staged.append(case_id)
                    if result.note:
                        corrected[case_id] = report.corrected[case_id] = result.note
                    message = f"written: {case_id} <- {source.image}"
                else:
                    reject(source.image, result.reason)
                    message = f"rejected: {source.image}: {result.reason}"
                if verbose:
                    tqdm.write(message)
                if len(staging.staged) >= PUBLISH_EVERY:
                    staging.publish(write_bookkeeping)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        staging.publish(write_bookkeeping)
        staging.close()
    if interrupted:  # after publishing: the message says what the dataset now holds
        raise KeyboardInterrupt(report.kept())
    return report
