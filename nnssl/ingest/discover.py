"""Finding the images to ingest (folders and list files), pairing them with masks, and naming their cases.

Mask matching for ``--anatomy_masks DIR`` / ``--anonymization_masks DIR`` (per mask folder):

1. relative path: an image found at ``<input dir>/<sub/path>/<stem>.<ext>`` uses ``DIR/<sub/path>/<stem>.<any ext>``
   (an image from a list file uses ``DIR/<stem>.<any ext>``);
2. otherwise file stem: the one file anywhere under DIR whose stem is the image's stem;
3. otherwise the image has no mask of that kind.

"Stem" is the file name without its image extension (``a.nii.gz`` -> ``a``). Several candidates in step 1 or 2
make the match ambiguous and the image is rejected rather than paired with a guess. Mask paths given in a list
file's ``anatomy_mask`` / ``anonymization_mask`` columns win over mask folders.
"""

import csv
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from nnssl.ingest.errors import IngestError

PathLike = Union[str, os.PathLike]

# longest first, so that ".nii.gz" wins over a hypothetical ".gz"
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LIST_COLUMNS = ("image", "anatomy_mask", "anonymization_mask")
MAX_STEM_LENGTH = 48
HASH_LENGTH = 8


@dataclass(frozen=True)
class Source:
    """One image to ingest, with absolute (symlink-resolved) paths of the image and its optional masks, and the path
    it was found under (a symbolic link's own path), which names its case."""

    image: str
    anatomy_mask: Optional[str] = None
    anonymization_mask: Optional[str] = None
    found_as: Optional[str] = None

    @property
    def case_id(self) -> str:
        return case_identifier(self.image, self.found_as)


@dataclass
class Discovery:
    """Everything found: images to ingest, images rejected already while pairing masks (path -> reason), and the
    input folders searched (resolved), which relative paths in a metadata table refer to."""

    sources: List[Source] = field(default_factory=list)
    rejected: Dict[str, str] = field(default_factory=dict)
    roots: List[str] = field(default_factory=list)


def split_image_name(name: str) -> Optional[Tuple[str, str]]:
    """``(stem, extension)`` for a supported image file name (extension case-insensitive), else None."""
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[:-len(extension)], name[-len(extension):]
    return None


def case_identifier(image_path: str, found_as: Optional[str] = None) -> str:
    """Stable, unique nnU-Net case name for a source image: ``<sanitised stem>_<8 hex of sha1(absolute path)>``.

    Only letters, digits and '-' survive from the stem, so the name has no dots or spaces and never ends in an
    nnU-Net channel suffix like ``_0000``; the hash (of the resolved path) keeps equal file names from different
    folders apart. The stem is that of ``found_as`` when given: a symbolic link names its case, not its target.
    """
    name = os.path.basename(found_as or image_path)
    stem = (split_image_name(name) or (name, ""))[0]
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", stem).strip("-")[:MAX_STEM_LENGTH].strip("-") or "image"
    digest = hashlib.sha1(os.path.abspath(image_path).encode("utf-8")).hexdigest()[:HASH_LENGTH]
    return f"{cleaned}_{digest}"


def _resolved(path: PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _is_inside(path: str, folders: Iterable[str]) -> bool:
    return any(path == folder or path.startswith(folder + os.sep) for folder in folders)


def find_images(root: str, excluded: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """``(absolute path, relative stem)`` of every image under ``root``, sorted; hidden and excluded folders skipped.

    The path is the one found (a symbolic link stays a link); resolve it to compare files."""
    if _is_inside(root, excluded):
        return
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and not _is_inside(_resolved(os.path.join(folder, d)), excluded))
        for name in sorted(files):
            parts = split_image_name(name)
            if parts is None or name.startswith("."):
                continue
            relative_folder = os.path.relpath(folder, root)
            relative_stem = parts[0] if relative_folder == "." else os.path.join(relative_folder, parts[0])
            yield os.path.abspath(os.path.join(folder, name)), Path(relative_stem).as_posix()


class MaskFolder:
    """The masks under one folder, indexed for the matching rule in this module's docstring."""

    def __init__(self, root: str, kind: str):
        self.root = root
        self.kind = kind
        self.by_relative_stem: Dict[str, List[str]] = defaultdict(list)
        self.by_stem: Dict[str, List[str]] = defaultdict(list)
        for path, relative_stem in find_images(root, excluded=()):
            self.by_relative_stem[relative_stem].append(_resolved(path))
            self.by_stem[relative_stem.rsplit("/", 1)[-1]].append(_resolved(path))

    def match(self, relative_stem: str) -> Tuple[Optional[str], Optional[str]]:
        """``(mask path or None, rejection reason or None)`` for an image with this relative stem."""
        stem = relative_stem.rsplit("/", 1)[-1]
        for candidates in (self.by_relative_stem.get(relative_stem, []), self.by_stem.get(stem, [])):
            if len(candidates) == 1:
                return candidates[0], None
            if len(candidates) > 1:
                return None, (f"ambiguous {self.kind}: {len(candidates)} candidates in {self.root} "
                              f"({', '.join(os.path.basename(c) for c in candidates[:4])})")
        return None, None


def read_list_file(list_file: PathLike) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """``(image, anatomy mask, anonymization mask)`` per entry of a list file, as absolute paths (links unresolved).

    Either one image path per line, or a table (tab- or comma-separated) whose header has an ``image`` column and
    optionally ``anatomy_mask`` / ``anonymization_mask`` (further columns are ignored, so OpenMind-style
    metadata tables work as they are). Blank lines and lines starting with '#' are ignored; relative paths are
    relative to the list file's folder.
    """
    path = Path(list_file)
    if not path.is_file():
        raise IngestError(f"List file {path} does not exist.")
    base = path.resolve().parent
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]

    def absolute(value: Optional[str]) -> Optional[str]:
        value = (value or "").strip()
        return os.path.abspath(base / os.path.expanduser(value)) if value else None

    if not lines:
        return []
    delimiter = "\t" if "\t" in lines[0] else ","
    header = [column.strip().lower() for column in lines[0].split(delimiter)]
    if "image" not in header:
        return [(absolute(line), None, None) for line in lines]
    rows = csv.DictReader(lines[1:], fieldnames=header, delimiter=delimiter)
    return [(absolute(row["image"]), absolute(row.get("anatomy_mask")), absolute(row.get("anonymization_mask")))
            for row in rows if (row.get("image") or "").strip()]


def _existing_folder(path: Optional[PathLike], flag: str) -> Optional[str]:
    if path is None:
        return None
    resolved = _resolved(path)
    if not os.path.isdir(resolved):
        raise IngestError(f"{flag} {path} is not an existing folder.")
    return resolved


def discover(input_dirs: Sequence[PathLike] = (), list_file: Optional[PathLike] = None,
             anatomy_masks: Optional[PathLike] = None, anonymization_masks: Optional[PathLike] = None,
             excluded: Sequence[PathLike] = ()) -> Discovery:
    """All images of the list file, then of the input folders, each once, paired with masks.

    ``excluded`` folders (the output dataset) are never searched; neither are the mask folders, so masks kept
    inside an input folder are not mistaken for images.
    """
    roots = [_existing_folder(folder, "-i") for folder in input_dirs]
    mask_folders = {kind: MaskFolder(folder, kind) for kind, folder in
                    (("anatomy mask", _existing_folder(anatomy_masks, "--anatomy_masks")),
                     ("anonymization mask", _existing_folder(anonymization_masks, "--anonymization_masks")))
                    if folder is not None}
    skipped_folders = [_resolved(folder) for folder in excluded] + [m.root for m in mask_folders.values()]

    candidates: List[Tuple[str, str, Dict[str, Optional[str]]]] = []
    if list_file is not None:
        for image, anatomy, anonymization in read_list_file(list_file):
            stem = (split_image_name(os.path.basename(image)) or (os.path.basename(image), ""))[0]
            candidates.append((image, stem, {"anatomy mask": anatomy, "anonymization mask": anonymization}))
    for root in roots:
        for image, relative_stem in find_images(root, skipped_folders):
            candidates.append((image, relative_stem, {}))

    discovery = Discovery(roots=roots)
    seen = set()
    for found_as, relative_stem, explicit in candidates:
        image = _resolved(found_as)
        if image in seen:
            continue
        seen.add(image)
        masks: Dict[str, Optional[str]] = {}
        problems = []
        for kind in ("anatomy mask", "anonymization mask"):
            masks[kind] = explicit.get(kind) and _resolved(explicit[kind])
            if masks[kind] is None and kind in mask_folders:
                masks[kind], problem = mask_folders[kind].match(relative_stem)
                if problem:
                    problems.append(problem)
        if problems:
            discovery.rejected[image] = "; ".join(problems)
        else:
            discovery.sources.append(Source(image, masks["anatomy mask"], masks["anonymization mask"], found_as))
    return discovery
