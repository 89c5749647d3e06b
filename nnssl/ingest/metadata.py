"""Which discovered images to ingest, and with which metadata: the metadata table, ``--modality``,
``--min_quality`` / ``--max_quality`` and ``--exclude_list``.

Matching (``--metadata_match``), for table rows and exclude-list entries alike:
  path (default): an entry's path relative to an input folder (``-i DIR``: ``DIR/<entry>`` is the image), or an
    absolute path (the image at that path; symbolic links resolved). OpenMind's ``image_path`` is relative to its
    ``OpenMind`` folder, so ``-i .../OpenMind`` matches its rows.
  name: the entry's file name (``sub-01_T1w.nii.gz``) against the image's file name, anywhere.
An image that several rows match, or a row that matches several images, is ambiguous: each such image is excluded
with the lines named. Excluded images never touch the dataset (their earlier cases leave it); every exclusion has its
reason in nnssl_ingest_summary.json under ``excluded``.
"""

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nnssl.ingest.discover import PathLike, Source
from nnssl.ingest.errors import IngestError
from nnssl.ingest.metadata_table import OPENMIND_COLUMNS, MetadataRow, read_metadata_table

MATCH_MODES = ("path", "name")


@dataclass
class MetadataOptions:
    """What the user asked for; ``columns`` maps a field (image, subject, session, modality, quality) to its column
    and ``named_columns`` lists the fields whose column was given explicitly (they must exist)."""

    table: Optional[PathLike] = None
    columns: Dict[str, Optional[str]] = field(default_factory=lambda: dict(OPENMIND_COLUMNS))
    named_columns: Sequence[str] = ()
    match: str = "path"
    modalities: Sequence[str] = ()
    min_quality: Optional[float] = None
    max_quality: Optional[float] = None
    exclude_list: Optional[PathLike] = None

    def filters_needing(self) -> List[str]:
        return (["modality"] if self.modalities else []) + \
               (["quality"] if self.min_quality is not None or self.max_quality is not None else [])


@dataclass
class Selection:
    """The outcome: metadata of each kept image (by resolved path; only with a table), excluded images with their
    reason, and table rows / exclude-list entries that matched no image (reported, not fatal)."""

    metadata: Dict[str, Dict[str, object]] = field(default_factory=dict)
    excluded: Dict[str, str] = field(default_factory=dict)
    rows_without_image: List[str] = field(default_factory=list)
    exclude_entries_without_image: List[str] = field(default_factory=list)

    def report(self, options: MetadataOptions) -> Dict[str, object]:
        """The summary's ``metadata`` section."""
        return {"table": options.table and os.path.abspath(options.table), "match": options.match,
                "exclude_list": options.exclude_list and os.path.abspath(options.exclude_list),
                "rows_without_image": self.rows_without_image,
                "exclude_list_entries_without_image": self.exclude_entries_without_image}


class Matcher:
    """Finds the images an entry names, by the rule in this module's docstring."""

    def __init__(self, sources: Sequence[Source], roots: Sequence[str], mode: str):
        if mode not in MATCH_MODES:
            raise IngestError(f"--metadata_match {mode!r} is not one of {', '.join(MATCH_MODES)}.")
        self.mode = mode
        self.roots = roots
        self.index: Dict[str, Set[str]] = defaultdict(set)
        for source in sources:
            found_as = source.found_as or source.image
            if mode == "name":
                self.index[os.path.basename(found_as)].add(source.image)
                continue
            self.index[source.image].add(source.image)
            for root in roots:
                if found_as.startswith(root + os.sep):
                    self.index[Path(os.path.relpath(found_as, root)).as_posix()].add(source.image)

    def images(self, entry: str) -> Set[str]:
        if self.mode == "name":
            return self.index.get(os.path.basename(entry.replace("\\", "/")), set())
        if os.path.isabs(os.path.expanduser(entry)):
            return self.index.get(os.path.realpath(os.path.expanduser(entry)), set())
        return self.index.get(Path(os.path.normpath(entry.replace("\\", "/"))).as_posix(), set())


def read_exclude_list(path: PathLike) -> List[Tuple[int, str]]:
    """``(line number, entry)`` of an exclude list: one image per line; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise IngestError(f"Exclude list {path} cannot be read ({reason}). Give a text file with one image path "
                          f"(or file name, with --metadata_match name) per line.") from None
    return [(number, line.strip()) for number, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#")]


def _filter_reason(row: MetadataRow, where: str, options: MetadataOptions) -> Optional[str]:
    """Why the filters exclude the image of ``row``, or None."""
    if options.modalities and row.modality not in options.modalities:
        found = f"modality {row.modality!r}" if row.modality else "no modality"
        return f"{found} ({where}) is not one of --modality {' '.join(options.modalities)}"
    bounds = (("min_quality", options.min_quality, lambda q, b: q < b, "below"),
              ("max_quality", options.max_quality, lambda q, b: q > b, "above"))
    for name, bound, fails, word in bounds:
        if bound is None:
            continue
        if row.quality is None:
            return f"no quality score ({where}), needed by --{name}"
        if fails(row.quality, bound):
            return f"quality score {row.quality:g} ({where}) is {word} --{name} {bound:g}"
    return None


def select(sources: Sequence[Source], roots: Sequence[str], options: MetadataOptions) -> Selection:
    """Apply the exclude list, the table and the filters to the discovered ``sources``."""
    selection = Selection()
    matcher = Matcher(sources, roots, options.match)
    if options.exclude_list is not None:
        for number, entry in read_exclude_list(options.exclude_list):
            images = matcher.images(entry)
            if not images:
                selection.exclude_entries_without_image.append(f"line {number}: {entry}")
            for image in images:
                selection.excluded.setdefault(image, f"in the exclude list {options.exclude_list} (line {number})")
    if options.table is None:
        return selection
    table = read_metadata_table(options.table, options.columns,
                                sorted(set(options.named_columns) | set(options.filters_needing())))
    rows_of: Dict[str, List[MetadataRow]] = defaultdict(list)
    shared: Set[int] = set()  # lines that match several images
    for row in table.rows:
        images = matcher.images(row.image)
        if not images:
            selection.rows_without_image.append(f"line {row.line}: {row.image}")
        if len(images) > 1:
            shared.add(row.line)
        for image in images:
            rows_of[image].append(row)
    for source in sources:
        image = source.image
        if image in selection.excluded:
            continue
        rows = rows_of.get(image, [])
        if not rows:
            selection.excluded[image] = f"no row in the metadata table {table.path}"
        elif len(rows) > 1 or rows[0].line in shared:
            lines = ", ".join(str(row.line) for row in rows)
            what = f"lines {lines} of {table.path} all match this image" if len(rows) > 1 else \
                f"line {lines} of {table.path} matches several images"
            selection.excluded[image] = f"ambiguous metadata: {what} (--metadata_match {options.match})"
        else:
            reason = _filter_reason(rows[0], f"line {rows[0].line} of {table.path}", options)
            if reason:
                selection.excluded[image] = reason
            else:
                selection.metadata[image] = rows[0].metadata()
    return selection
