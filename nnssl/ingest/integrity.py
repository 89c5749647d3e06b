"""Is every voxel byte the header promises really in the file, and is the spacing it declares usable?

Reasons start with stable phrases, as in ``validate``: "truncated" (fewer voxel bytes than the header promises, or a
compressed stream without its end), "corrupt" (compressed data that fails to decode or its checksum) and
"invalid spacing".
"""

import bz2
import os
import zlib
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from nnssl.ingest.stored_volume import StoredVolume, VoxelStream, stored_volume

CHUNK_BYTES = 1 << 16  # compressed bytes per step; deflate expands at most ~1000x, so at most ~64 MB at once
DECOMPRESSORS: Dict[str, Callable] = {
    "gzip": lambda: zlib.decompressobj(wbits=31),  # checks the gzip trailer (CRC-32 and length) too
    "zlib": zlib.decompressobj,
    "bzip2": bz2.BZ2Decompressor,
}


class CorruptStream(Exception):
    """Compressed voxel data that does not decode."""


def decoded_length(voxels: VoxelStream) -> Tuple[int, bool]:
    """Bytes the voxel stream decodes to, and whether it ended where its encoding says it ends (always true for raw
    data). Several concatenated gzip/bzip2 members are one stream; zero padding after the end is ignored."""
    if voxels.encoding == "raw":
        return max(0, os.path.getsize(voxels.file) - voxels.start), True
    new_decompressor = DECOMPRESSORS[voxels.encoding]
    decompressor, length = new_decompressor(), 0
    try:
        with open(voxels.file, "rb") as file:
            file.seek(voxels.start)
            for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
                while chunk:
                    length += len(decompressor.decompress(chunk))
                    chunk = decompressor.unused_data if decompressor.eof else b""
                    if chunk.strip(b"\0"):
                        decompressor = new_decompressor()
                    else:
                        chunk = b""
    except (zlib.error, OSError, EOFError) as error:
        if isinstance(error, OSError) and error.filename:  # a file problem, not a decoding problem
            raise
        raise CorruptStream(str(error)) from None
    return length, decompressor.eof


def missing_voxels(stored: StoredVolume) -> Optional[str]:
    """Why the stored voxels are incomplete or corrupt, or None when all the promised bytes are there."""
    voxels = stored.voxels
    if voxels is None:
        return None
    data_file = os.path.basename(voxels.file)
    try:
        length, complete = decoded_length(voxels)
    except CorruptStream as error:
        return f"corrupt: the {voxels.encoding} voxel data of {data_file} does not decode ({error})"
    present = max(0, length - voxels.skip)
    if not complete:
        return (f"truncated: the {voxels.encoding} voxel data of {data_file} ends before its end marker "
                f"({min(present, voxels.size)} of {voxels.size} voxel bytes)")
    if present < voxels.size:
        return f"truncated: the header promises {voxels.size} voxel bytes, {data_file} holds {present}"
    return None


def spacing_problem(stored: StoredVolume) -> Optional[str]:
    """Why the header's voxel spacing is unusable (zero, negative or not finite), or None."""
    spacing = np.array(stored.spacing, dtype=float)
    if np.all(np.isfinite(spacing) & (spacing > 0)):
        return None
    return (f"invalid spacing: the header's {stored.spacing_field} is "
            f"({', '.join(f'{value:g}' for value in stored.spacing)}): zero, negative or non-finite")


def incomplete_file_problem(path: str) -> Optional[str]:
    """``missing_voxels`` of the file at ``path`` (None when its header cannot be parsed: ITK's reader decides)."""
    stored = stored_volume(path)
    return None if stored is None else missing_voxels(stored)
