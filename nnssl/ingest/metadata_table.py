"""Reading a metadata table (CSV or TSV) that describes the images to ingest: one row per image with its subject,
session, modality and quality score.

The default column names read OpenMind's ``openneuro_metadata.csv`` as it is: ``image_path`` (relative to the
OpenMind image folder, BIDS-like ``ds000001/sub-01/ses-1/anat/...``), ``modality`` and ``image_quality_score``. That
table has no subject or session column: without ``--metadata_subject_column`` / ``--metadata_session_column`` they
come from the image path (``subject_from_path``), as OpenMind's own converter derives them.
"""

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

from nnssl.ingest.discover import PathLike
from nnssl.ingest.errors import IngestError

FIELDS = ("image", "subject", "session", "modality", "quality")
# OpenMind's openneuro_metadata.csv; subject and session have no column there (None: taken from the image path)
OPENMIND_COLUMNS: Dict[str, Optional[str]] = {"image": "image_path", "subject": None, "session": None,
                                              "modality": "modality", "quality": "image_quality_score"}


def column_option(field_name: str) -> str:
    return f"--metadata_{field_name}_column"


@dataclass(frozen=True)
class MetadataRow:
    """One row: ``line`` is its line number in the table (for messages), ``image`` the image column's text."""

    line: int
    image: str
    subject: Optional[str] = None
    session: Optional[str] = None
    modality: Optional[str] = None
    quality: Optional[float] = None

    def metadata(self) -> Dict[str, object]:
        """What is stored per case."""
        return {"subject": self.subject, "session": self.session, "modality": self.modality,
                "quality": self.quality}


@dataclass
class MetadataTable:
    path: str
    rows: List[MetadataRow] = field(default_factory=list)


def subject_from_path(image: str) -> Tuple[Optional[str], Optional[str]]:
    """``(subject, session)`` from a BIDS-like path: the path up to its first ``sub-*`` folder (so ``sub-01`` of two
    studies stays two subjects: ``ds000001/sub-01``) and the ``ses-*`` folder below it; None where there is none."""
    parts = PurePosixPath(image.replace("\\", "/")).parts
    for index, part in enumerate(parts[:-1]):
        if part.startswith("sub-"):
            session = next((p for p in parts[index + 1:-1] if p.startswith("ses-")), None)
            return "/".join(parts[:index + 1]), session
    return None, None


def _delimiter(path: Path, header: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    return "\t" if "\t" in header else ","


def _quality(value: str, path: Path, line: int, column: str) -> Optional[float]:
    """The quality score of a cell; an empty or NaN cell is no score (pandas writes missing values so)."""
    text = value.strip()
    if not text or text.lower() in ("nan", "n/a", "na"):
        return None
    try:
        number = float(text)
    except ValueError:
        raise IngestError(f"Metadata table {path}, line {line}: the quality score {text!r} in column '{column}' is "
                          f"not a number. Fix the cell (leave it empty for no score), or name the right column with "
                          f"{column_option('quality')}.") from None
    return None if math.isnan(number) else number


def read_metadata_table(table: PathLike, columns: Dict[str, Optional[str]], required: List[str]) -> MetadataTable:
    """Every row of ``table``. ``columns`` maps a field of ``FIELDS`` to its column (None: no column); the image
    column and the columns of ``required`` fields must exist, other absent columns leave their field empty.
    Raises IngestError naming the file and the problem for an unreadable table, a missing column, a row without
    image or a quality score that is not a number."""
    path = Path(os.path.expanduser(os.fspath(table)))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise IngestError(f"Metadata table {path} cannot be read ({reason}). Give a CSV or TSV file (UTF-8) whose "
                          f"first line names the columns.") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise IngestError(f"Metadata table {path} is empty: its first line must name the columns "
                          f"(at least the image column '{columns['image']}').")
    reader = csv.DictReader(lines, delimiter=_delimiter(path, lines[0]))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    present = {}
    for field_name in FIELDS:
        column = columns.get(field_name)
        if column is not None and column in header:
            present[field_name] = column
        elif column is not None and (field_name == "image" or field_name in required):
            raise IngestError(f"Metadata table {path} has no column '{column}' for the {field_name} "
                              f"(its columns: {', '.join(header)}). Name the right one with "
                              f"{column_option(field_name)}.")
    table_rows = MetadataTable(str(path.resolve()))
    for row in reader:
        line = reader.line_num
        values = {f: (row.get(column) or "").strip() for f, column in present.items()}
        if not values["image"]:
            if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
                continue  # a blank line
            raise IngestError(f"Metadata table {path}, line {line}: no image path in column '{present['image']}'. "
                              f"Fill it in or delete the row.")
        subject, session = subject_from_path(values["image"])
        table_rows.rows.append(MetadataRow(
            line, values["image"],
            subject=values.get("subject") or (None if "subject" in present else subject),
            session=values.get("session") or (None if "session" in present else session),
            modality=values.get("modality") or None,
            quality=_quality(values["quality"], path, line, present["quality"]) if "quality" in present else None))
    return table_rows
