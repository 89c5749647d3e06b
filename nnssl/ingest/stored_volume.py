"""What an image file's header says about its stored voxels, read from the header itself.

ITK's readers repair or hide what the header says: its NIfTI reader zero-fills voxel data that a truncated file
lacks and turns a zero, negative or NaN ``pixdim`` into 1 or its absolute value (only a warning that does not name
the file). So ingest reads the header itself: where the voxel stream lies (this file or a detached data file), how
it is encoded, how many voxel bytes it must hold, and the spacing as written. Formats: NIfTI-1/2 (.nii, .nii.gz),
NRRD (.nrrd, attached or one detached data file) and MetaImage (.mha, .mhd).
"""

import io
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

# a header larger than this is not a header (random bytes that happen to be named .mha)
MAX_TEXT_HEADER_BYTES = 1 << 20
NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
NRRD_SPATIAL_KINDS = ("domain", "space")


@dataclass(frozen=True)
class VoxelStream:
    """Where the voxels are: ``file`` from byte ``start`` on, encoded as ``encoding`` (raw, gzip, zlib, bzip2);
    the decoded stream holds ``skip`` bytes (NIfTI's own header inside a .nii.gz) and then ``size`` voxel bytes."""

    file: str
    start: int
    encoding: str
    skip: int
    size: int


@dataclass(frozen=True)
class StoredVolume:
    """The header's promises. ``voxels`` is None for layouts not checked here (NRRD text encodings, data split
    over several files): ITK's reader fails on those itself when data is missing."""

    voxels: Optional[VoxelStream]
    spacing: Tuple[float, ...]
    spacing_field: str


def stored_volume(path: str) -> Optional[StoredVolume]:
    """The header of the image at ``path``, or None when it cannot be parsed (ITK's reader then rejects the file)."""
    lower = path.lower()
    try:
        if lower.endswith((".nii", ".nii.gz")):
            return _nifti(path)
        if lower.endswith(".nrrd"):
            return _nrrd(path)
        if lower.endswith((".mha", ".mhd")):
            return _metaimage(path)
    except Exception:  # an unparsable header: not checkable here, and ITK's reader rejects the file
        return None
    return None


def _nifti(path: str) -> Optional[StoredVolume]:
    import nibabel
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as file:
        raw = file.read(nibabel.Nifti2Header.sizeof_hdr)
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    header_class = nibabel.Nifti2Header if nibabel.Nifti2Header.sizeof_hdr in sizes else nibabel.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(raw), check=False)  # check=False: no silent pixdim repair
    shape = header.get_data_shape()
    offset = max(int(header["vox_offset"]), header_class.single_vox_offset)
    size = int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    encoding = "gzip" if path.lower().endswith(".gz") else "raw"
    spacing = tuple(float(value) for value in header["pixdim"][1:1 + min(3, len(shape))])
    return StoredVolume(VoxelStream(path, 0, encoding, offset, size), spacing, "pixdim")


def _text_header(path: str, last_key: Optional[str], separator: str) -> Tuple[Dict[str, str], int]:
    """``key: value`` (NRRD) or ``Key = Value`` (MetaImage) fields, keys lower-case, and the byte where the header
    ends: after ``last_key``'s line, or after the blank line (NRRD) or at the end of the file."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as file:
        while file.tell() < MAX_TEXT_HEADER_BYTES:
            line = file.readline()
            text = line.decode("latin-1").rstrip("\r\n")
            if not line or (last_key is None and not text):
                return fields, file.tell()
            key, found, value = text.partition(separator)
            if found and not text.startswith("#"):
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() == last_key:
                    return fields, file.tell()
    raise ValueError("no header")


def _itk_voxel_bytes(path: str) -> int:
    """Bytes the voxels take as ITK interprets the header (NRRD and MetaImage store exactly these)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    one_voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * sitk.GetArrayViewFromImage(one_voxel).nbytes


def _data_file(path: str, name: Optional[str]) -> Optional[str]:
    """The one file holding the voxels: ``path`` itself (attached / LOCAL), a detached file, or None for lists and
    numbered patterns."""
    if name is None or name.upper() == "LOCAL":
        return path
    if name.startswith("LIST") or "%" in name or " " in name:
        return None
    return os.path.join(os.path.dirname(path), name)


def _stream(path: str, data_name: Optional[str], header_end: int, encoding: Optional[str],
            skip: int) -> Optional[VoxelStream]:
    data_file = _data_file(path, data_name)
    if data_file is None or encoding is None:
        return None
    try:
        size = _itk_voxel_bytes(path)
    except RuntimeError:  # a header ITK refuses (e.g. a zero spacing): the reader rejects the file
        return None
    start = header_end if data_file == path else 0
    if skip < 0:  # -1: the voxels are the file's last bytes (raw data only)
        start, skip = max(start, os.path.getsize(data_file) - size), 0
    return VoxelStream(data_file, start, encoding, skip, size)


def _nrrd(path: str) -> Optional[StoredVolume]:
    with open(path, "rb") as file:
        if file.read(4) != b"NRRD":
            return None
    fields, header_end = _text_header(path, None, ":")
    encoding = NRRD_ENCODINGS.get(fields.get("encoding", "").lower())
    if int(fields.get("line skip", fields.get("lineskip", "0"))):
        encoding = None
    voxels = _stream(path, fields.get("data file", fields.get("datafile")), header_end, encoding,
                     int(fields.get("byte skip", fields.get("byteskip", "0"))))
    kinds = fields.get("kinds", "").split()
    spatial = [kind.lower() in NRRD_SPATIAL_KINDS for kind in kinds] or None
    if "space directions" in fields:
        vectors = re.findall(r"\(([^)]*)\)|none", fields["space directions"])
        spacing = tuple(float(np.linalg.norm([float(v) for v in vector.split(",")])) for vector in vectors if vector)
        return StoredVolume(voxels, spacing, "space directions")
    values = fields.get("spacings", "").split()
    spacing = tuple(float(v) for i, v in enumerate(values) if spatial is None or spatial[i])
    return StoredVolume(voxels, spacing, "spacings")


def _metaimage(path: str) -> Optional[StoredVolume]:
    fields, header_end = _text_header(path, "elementdatafile", "=")
    if "elementdatafile" not in fields:
        return None
    encoding = "zlib" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    voxels = _stream(path, fields["elementdatafile"], header_end, encoding, 0)
    if voxels is not None and voxels.file != path:  # HeaderSize: bytes before the voxels in a detached data file
        header_size = int(fields.get("headersize", "0"))
        start = os.path.getsize(voxels.file) - voxels.size if header_size < 0 else header_size
        voxels = VoxelStream(voxels.file, max(0, start), encoding, 0, voxels.size)
    field = "ElementSpacing" if "elementspacing" in fields else "ElementSize"
    spacing = tuple(float(v) for v in fields.get(field.lower(), "").split())
    return StoredVolume(voxels, spacing, field)
