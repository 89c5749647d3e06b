"""The ``nnssl_adaptation_plan`` stored in every pretraining checkpoint (nnssl's schema).

Downstream code (ours, nnssl's, nnU-Net's development-branch nnssl integration) reads it to rebuild the pretrained
architecture, to preprocess a labeled dataset like the pretraining data, and to know which state-dict prefixes
hold the transferable stem and encoder.
"""

import copy
from typing import Sequence

RESENC_L_FEATURES = [32, 64, 128, 256, 320, 320]
RESENC_L_BLOCKS = [1, 3, 4, 6, 6, 6]
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")


def is_resenc_l(arch_kwargs: dict) -> bool:
    """True when the plans' architecture is exactly the published ResEnc-L (nnssl's ``ResEncL`` preset name)."""
    return (list(arch_kwargs.get("features_per_stage", [])) == RESENC_L_FEATURES
            and list(arch_kwargs.get("n_blocks_per_stage", [])) == RESENC_L_BLOCKS
            and list(arch_kwargs.get("n_conv_per_stage_decoder", [])) == [1] * 5
            and [list(k) for k in arch_kwargs.get("kernel_sizes", [])] == [[3, 3, 3]] * 6
            and [list(s) for s in arch_kwargs.get("strides", [])] == [[1, 1, 1]] + [[2, 2, 2]] * 5)


def architecture_plans(architecture: dict) -> dict:
    """nnssl's ``architecture_plans`` block from an nnU-Net plans ``architecture`` block."""
    arch_kwargs = copy.deepcopy(architecture["arch_kwargs"])
    if is_resenc_l(arch_kwargs):
        return {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    class_name = architecture["network_class_name"].rsplit(".", 1)[-1]
    return {
        "arch_class_name": class_name,
        "arch_kwargs": arch_kwargs,
        "arch_kwargs_requiring_import": list(architecture["_kw_requires_import"]),
    }


def pretrain_plan(plans: dict, configuration: str) -> dict:
    """The nnU-Net plans reduced to the configuration that was trained (what downstream preprocessing must match)."""
    reduced = copy.deepcopy(plans)
    reduced["configurations"] = {configuration: copy.deepcopy(plans["configurations"][configuration])}
    return reduced


def build_adaptation_plan(plans: dict, configuration: str, num_input_channels: int,
                          recommended_downstream_patch_size: Sequence[int]) -> dict:
    architecture = plans["configurations"][configuration]["architecture"]
    return {
        "architecture_plans": architecture_plans(architecture),
        "pretrain_plan": pretrain_plan(plans, configuration),
        "pretrain_num_input_channels": int(num_input_channels),
        "recommended_downstream_patchsize": [int(i) for i in recommended_downstream_patch_size],
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
        "key_to_lpe": None,
    }
