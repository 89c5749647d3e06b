"""A downstream patch of the user's (``nnssl_prepare_finetune -ps``), checked against the pretrained network.

A U-Net halves the patch at every stride-2 stage, so every axis must be a multiple of the product of its strides
(nnU-Net's planners keep to that too); a Primus cuts the patch into patch-embedding cubes, one token each, so every
axis must be a multiple of the cube. Conv weights do not depend on the patch; a Primus's learned positional
embedding does, and is resampled to the new token grid when the weights are loaded (``transfer.resampled_lpe``).
"""

from typing import List, Sequence

import numpy as np

from nnssl.architectures import is_primus
from nnssl.errors import InvalidValueError


def patch_unit(architecture: dict) -> List[int]:
    """Per axis, what every patch edge must be a multiple of for this plans ``architecture`` block."""
    kwargs = architecture["arch_kwargs"]
    if is_primus(architecture["network_class_name"]):
        return [int(e) for e in kwargs["patch_embed_size"]]
    strides = [[s] * 3 if np.isscalar(s) else list(s) for s in kwargs["strides"]]
    return [int(u) for u in np.prod(np.array(strides, dtype=int), axis=0)]


def check_downstream_patch(patch_size: Sequence[int], architecture: dict) -> List[int]:
    """``patch_size`` as ints if each entry is a positive multiple of ``patch_unit``; otherwise an error that
    names the unit and the nearest patch that fits."""
    unit = patch_unit(architecture)
    patch = [int(p) for p in patch_size]
    if len(patch) == len(unit) and all(p > 0 and p % u == 0 for p, u in zip(patch, unit)):
        return patch
    what = "Primus patch embedding" if is_primus(architecture["network_class_name"]) else \
        "U-Net's total stride (the product of its stage strides)"
    nearest = [max(u, int(round(p / u)) * u) for p, u in zip(patch, unit)] if len(patch) == len(unit) else unit
    raise InvalidValueError(f"Downstream patch size {list(patch_size)} does not fit the pretrained network: give "
                            f"{len(unit)} sizes (nnU-Net axis order), each a positive multiple of the {what} "
                            f"{unit}, e.g. -ps {' '.join(map(str, nearest))}.")
