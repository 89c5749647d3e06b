"""Building the plans' network for either family nnssl supports: dna U-Nets (ResEnc, PlainConv) and Primus.

nnU-Net's ``get_network_from_plans`` passes ``deep_supervision`` to every class it is given; dna's ``Primus`` has
no such argument (and no deep supervision), so nnU-Net only builds it from trainers that hard-code it. Here the
argument goes only to classes that accept it, and a Primus patch that its patch embedding does not tile is refused
with a message instead of dna's bare assertion.
"""

import inspect
import pydoc
from typing import Optional, Sequence

from torch import nn

from nnssl.errors import InvalidValueError
from nnssl.presets import PRIMUS_CLASS, check_patch_embedding

PRIMUS_NAMES = ("Primus", "PrimusS", "PrimusB", "PrimusM", "PrimusL")


def is_primus(network_class_name: str) -> bool:
    """Whether an nnU-Net plans ``network_class_name`` (dotted or bare) is a Primus transformer."""
    return network_class_name.rsplit(".", 1)[-1] in PRIMUS_NAMES


def accepts_deep_supervision(network_class_name: str) -> bool:
    network_class = pydoc.locate(network_class_name)
    return network_class is None or "deep_supervision" in inspect.signature(network_class).parameters


def network_from_plans(network_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                       input_channels: int, output_channels: int, deep_supervision: Optional[bool] = False,
                       source: str = "the plans") -> nn.Module:
    """nnU-Net's ``get_network_from_plans``, without the ``deep_supervision`` argument for classes lacking it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if network_class_name == PRIMUS_CLASS:
        check_patch_embedding(arch_kwargs["input_shape"], arch_kwargs["patch_embed_size"], source)
    if not accepts_deep_supervision(network_class_name):
        deep_supervision = None
    return get_network_from_plans(network_class_name, arch_kwargs, list(arch_kwargs_req_import), input_channels,
                                  output_channels, allow_init=True, deep_supervision=deep_supervision)


def network_from_configuration(configuration_manager, input_channels: int, output_channels: int,
                               deep_supervision: bool = False) -> nn.Module:
    """The network of an nnU-Net ``ConfigurationManager``; a Primus must be trained at the patch it was built for."""
    kwargs = configuration_manager.network_arch_init_kwargs
    name = configuration_manager.network_arch_class_name
    if name == PRIMUS_CLASS and list(kwargs["input_shape"]) != list(configuration_manager.patch_size):
        raise InvalidValueError(f"The plans' Primus is built for input_shape {kwargs['input_shape']} but the "
                                f"configuration's patch_size is {configuration_manager.patch_size}: a Primus's "
                                f"positional embedding is sized for one patch. Make both the same in the plans file.")
    return network_from_plans(name, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                              input_channels, output_channels, deep_supervision)


def transferable_prefixes(network: nn.Module) -> tuple:
    """The state-dict prefixes of the pretrained parts (stem, encoder) of a dna network, as dna declares them."""
    return network.key_to_stem, network.key_to_encoder

