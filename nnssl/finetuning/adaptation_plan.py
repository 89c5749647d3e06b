"""The ``nnssl_adaptation_plan`` stored in every pretraining checkpoint (nnssl's schema), written and read.

Downstream code (ours, nnssl's, nnU-Net's development-branch ``nnUNetv2_preprocess_like_nnssl``) reads it to rebuild
the pretrained architecture, to preprocess a labeled dataset like the pretraining data, and to know which
state-dict prefixes hold the transferable stem and encoder.

For U-Nets we always write the dynamic form (``arch_class_name`` "ResidualEncoderUNet" plus ``arch_kwargs``):
nnU-Net's development branch copies these fields into its plans and resolves the class by name, which fails for
nnssl's preset names ("ResEncL" with null kwargs). For a Primus it is the other way round: that branch builds only
the presets by name ("PrimusM" with null kwargs, via dna's ``PrimusM``), so the Primus-M preset is written by name
and any other Primus (the tiny CPU preset) in the dynamic form "Primus" + kwargs, which only nnssl reads. When
reading, the published presets are accepted too.
"""

import copy
from typing import Optional, Sequence

from nnssl import presets
from nnssl.errors import InvalidValueError
from nnssl.architectures import is_primus

DNA_ARCHITECTURES = "dynamic_network_architectures.architectures.unet"
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
PRESET_NAMES = {"ResEncL": "RESENC_L"}
# dna Primus's own declarations (Primus.key_to_encoder / key_to_stem / keys_to_in_proj / key_to_lpe)
PRIMUS_KEYS = {"key_to_encoder": "eva", "key_to_stem": "down_projection", "keys_to_in_proj": ["down_projection.proj"],
               "key_to_lpe": "eva.pos_embed"}
UNET_KEYS = {"key_to_encoder": KEY_TO_ENCODER, "key_to_stem": KEY_TO_STEM, "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
             "key_to_lpe": None}
PRIMUS_PRESET_NAMES = {"PrimusM": "PRIMUS_M"}


def primus_preset_name(architecture: dict) -> str:
    """The preset name ("PrimusM") whose network equals this plans Primus at its patch size, or ``""``."""
    for name, attribute in PRIMUS_PRESET_NAMES.items():
        preset = getattr(presets, attribute)
        if architecture == preset.architecture(architecture["arch_kwargs"]["input_shape"]):
            return name
    return ""


def architecture_plans(architecture: dict) -> dict:
    """nnssl's ``architecture_plans`` block from an nnU-Net plans ``architecture`` block."""
    preset_name = primus_preset_name(architecture) if is_primus(architecture["network_class_name"]) else ""
    if preset_name:
        return {"arch_class_name": preset_name, "arch_kwargs": None,
                "arch_kwargs_requiring_import": None}
    return {
        "arch_class_name": architecture["network_class_name"].rsplit(".", 1)[-1],
        "arch_kwargs": copy.deepcopy(architecture["arch_kwargs"]),
        "arch_kwargs_requiring_import": list(architecture["_kw_requires_import"]),
    }


def nnunet_architecture(adaptation_plan: dict, patch_size: Optional[Sequence[int]] = None) -> dict:
    """The nnU-Net plans ``architecture`` block that rebuilds the pretrained network (inverse of the above).

    A Primus is built for one patch (its positional embedding has one token per patch cube): ``patch_size`` when
    given (a downstream patch of the user's), else the recommended downstream patch (presets) or the one it was
    built for (the dynamic form). A U-Net's block does not depend on the patch."""
    arch = adaptation_plan["architecture_plans"]
    name = arch["arch_class_name"]
    if name in PRESET_NAMES:
        return getattr(presets, PRESET_NAMES[name]).architecture()
    if name in PRIMUS_PRESET_NAMES:
        preset = getattr(presets, PRIMUS_PRESET_NAMES[name])
        return preset.architecture(patch_size or adaptation_plan["recommended_downstream_patchsize"])
    if name == "Primus" and arch.get("arch_kwargs"):
        kwargs = copy.deepcopy(arch["arch_kwargs"])
        if patch_size is not None:
            kwargs["input_shape"] = [int(p) for p in patch_size]
        return {"network_class_name": presets.PRIMUS_CLASS, "arch_kwargs": kwargs,
                "_kw_requires_import": list(arch.get("arch_kwargs_requiring_import") or [])}
    if name not in ("ResidualEncoderUNet", "PlainConvUNet") or not arch.get("arch_kwargs"):
        raise InvalidValueError(f"Unsupported pretrained architecture {name!r} in the adaptation plan: nnssl "
                                f"fine-tunes ResEnc/PlainConv U-Nets (dynamic kwargs or the 'ResEncL' preset) and "
                                f"Primus ('PrimusM', or 'Primus' with kwargs).")
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
    keys = PRIMUS_KEYS if is_primus(architecture["network_class_name"]) else UNET_KEYS
    return {
        "architecture_plans": architecture_plans(architecture),
        "pretrain_plan": pretrain_plan(plans, configuration),
        "pretrain_num_input_channels": int(num_input_channels),
        "recommended_downstream_patchsize": [int(i) for i in recommended_downstream_patch_size],
        **copy.deepcopy(keys),
    }


def is_primus_plan(adaptation_plan: dict) -> bool:
    """Whether an adaptation plan describes a Primus checkpoint (False when it names no architecture)."""
    return is_primus((adaptation_plan.get("architecture_plans") or {}).get("arch_class_name") or "")
