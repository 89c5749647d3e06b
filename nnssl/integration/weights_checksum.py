"""Exact checksums of network weights: equal lines from every DDP rank show that the ranks stayed in sync, and a
part's checksum can be compared with the same part of a checkpoint (e.g. a frozen encoder)."""

import hashlib
from typing import Dict, Mapping

import torch

DIGITS = 16


def _update(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def state_dict_checksums(state: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 (first 16 hex digits) over names, dtypes and exact bytes: ``all`` and one per top-level part
    (the first name component, e.g. ``encoder``, ``decoder``)."""
    digests: Dict[str, "hashlib._Hash"] = {"all": hashlib.sha256()}
    for name in sorted(state):
        part = name.split(".", 1)[0]
        for key in ("all", part):
            _update(digests.setdefault(key, hashlib.sha256()), name, state[name])
    return {key: digest.hexdigest()[:DIGITS] for key, digest in digests.items()}


def format_checksums(checksums: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in checksums.items())
