"""The ``nnssl_adaptation_plan`` stored in every pretraining checkpoint (nnssl's schema), written and read.

Downstream code (ours, nnssl's, nnU-Net's development-branch ``nnUNetv2_preprocess_like_nnssl``) reads it to rebuild
the pretrained architecture, to preprocess a labeled dataset like the pretraining data, and to know which
state-dict prefixes hold the transferable stem and encoder.

We always write the dynamic form (``arch_class_name`` "ResidualEncoderUNet" plus ``arch_kwargs``): nnU-Net's
development branch copies these fields into its plans and resolves the class by name, which fails for nnssl's
preset names ("ResEncL" with null kwargs). When reading, the published presets are accepted too.
"""

import copy
from typing import Sequence

DNA_ARCHITECTURES = "dynamic_network_architectures.architectures.unet"
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
PRESET_NAMES = {"ResEncL": "RESENC_L"}


def architecture_plans(architecture: dict) -> dict:
    """nnssl's ``architecture_plans`` block from an nnU-Net plans ``architecture`` block."""
    return {
        "arch_class_name": architecture["network_class_name"].rsplit(".", 1)[-1],
        "arch_kwargs": copy.deepcopy(architecture["arch_kwargs"]),
        "arch_kwargs_requiring_import": list(architecture["_kw_requires_import"]),
    }


def nnunet_architecture(adaptation_plan: dict) -> dict:
    """The nnU-Net plans ``architecture`` block that rebuilds the pretrained network (inverse of the above)."""
    arch = adaptation_plan["architecture_plans"]
    name = arch["arch_class_name"]
    if name in PRESET_NAMES:
        from nnssl import presets

        return getattr(presets, PRESET_NAMES[name]).architecture()
    if name not in ("ResidualEncoderUNet", "PlainConvUNet") or not arch.get("arch_kwargs"):
        raise ValueError(f"Unsupported pretrained architecture {name!r} in the adaptation plan: nnssl fine-tunes "
                         f"ResEnc/PlainConv U-Nets (dynamic kwargs or the 'ResEncL' preset).")
    return {
        "network_class_name": f"{DNA_ARCHITECTURES}.{name}",
        "arch_kwargs": copy.deepcopy(arch["arch_kwargs"]),
        "_kw_requires_import": list(arch.get("arch_kwargs_requiring_import") or []),
    }


def pretrain_plan(plans: dict, configuration: str) -> dict:
    """The nnU-Net plans reduced to the configuration that was trained (what downstream preprocessing must match)."""
    reduced = copy.deepcopy(plans)
    reduced["configurations"] = {configuration: copy.deepcopy(plans["configurations"][configuration])}
    return reduced


def pretrain_configuration(adaptation_plan: dict) -> dict:
    """The single trained configuration of the adaptation plan's ``pretrain_plan``."""
    return next(iter(adaptation_plan["pretrain_plan"]["configurations"].values()))


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
