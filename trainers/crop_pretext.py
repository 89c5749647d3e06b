"""The base of pretext tasks that cut crops out of a patch of their own in the data pipeline (VoCo, SimCLR).

The loader cuts the method's patch (not the plans' patch) without a spatial transform or rotation margin, as the
reference does; the method's transforms (``crop_transforms``) then cut and augment the crops in nnU-Net's workers.
Full-size plans train on the class attribute ``geometry``; plans whose patch is below 128 voxels on some axis (the
tiny CPU preset) on ``tiny_geometry``, so a CPU step stays cheap. Variants override either.

The network sees crops only, so it is built for the crop size (a Primus's positional embedding is sized for one input
shape), and the adaptation plan records that size as the pretraining patch and the recommended downstream patch (as
the reference), so that fine-tuning rebuilds the same network.
"""

import copy

from typing import Sequence

from torch import nn

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnssl.finetuning.adaptation_plan import build_adaptation_plan
from nnssl.trainers.pretraining import nnsslPretrainTrainer

# Plans whose patch is smaller than this on some axis are CPU/test presets: they get the tiny geometry.
TINY_PLANS_PATCH_EDGE = 128


def configuration_at_patch(configuration: dict, patch_size: Sequence[int]) -> dict:
    """A plans configuration trained at ``patch_size``: its patch and, for a Primus, the ``input_shape`` it is built
    for (a U-Net's architecture does not depend on the patch)."""
    changed = copy.deepcopy(configuration)
    changed["patch_size"] = [int(p) for p in patch_size]
    arch_kwargs = changed["architecture"]["arch_kwargs"]
    if "input_shape" in arch_kwargs:
        arch_kwargs["input_shape"] = [int(p) for p in patch_size]
    return changed


class CropPretextTrainer(nnsslPretrainTrainer):
    geometry = None  # a frozen dataclass with ``patch_size`` and ``crop_size``
    tiny_geometry = None

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.crop_geometry = self.select_geometry(self.configuration_manager.patch_size)
        plans_configuration = self.configuration_manager.configuration
        # The network and the adaptation plan: the crop size; the loader: the method's patch (plans.json untouched).
        self.crop_configuration = configuration_at_patch(plans_configuration, self.crop_geometry.crop_size)
        self.configuration_manager = ConfigurationManager(
            {**plans_configuration, "patch_size": list(self.crop_geometry.patch_size)})

    @classmethod
    def select_geometry(cls, plans_patch_size: Sequence[int]):
        """The tiny geometry for CPU/test presets, the configured one otherwise."""
        return cls.tiny_geometry if min(plans_patch_size) < TINY_PLANS_PATCH_EDGE else cls.geometry

    def crop_transforms(self, augment: bool) -> BasicTransform:
        """The method's crops of one patch (augmented for training)."""
        raise NotImplementedError

    def initialize(self):
        first_call = not self.was_initialized
        super().initialize()
        if first_call:
            self.print_to_log_file(f"Crop geometry: {self.crop_geometry} -> crops of {self.crop_geometry.crop_size}")

    def build_network_architecture(self, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = False) -> nn.Module:
        return super().build_network_architecture(plans_manager, ConfigurationManager(self.crop_configuration),
                                                  num_input_channels, num_output_channels, enable_deep_supervision)

    def adaptation_plan(self) -> dict:
        plans = copy.deepcopy(self.plans_manager.plans)
        plans["configurations"][self.configuration_name] = self.crop_configuration
        return build_adaptation_plan(plans, self.configuration_name, self.num_input_channels,
                                     self.crop_geometry.crop_size)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """The loader cuts exactly the method's patch: no spatial transform, so no rotation margin."""
        rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, self.configuration_manager.patch_size, mirror_axes

    # nnU-Net declares these two static; here they are instance methods because the geometry is chosen per run
    # from the plans. nnU-Net only ever calls them on the trainer instance (get_dataloaders), with these arguments.
    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        return self.crop_transforms(augment=True)

    def get_validation_transforms(self, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None) -> BasicTransform:
        return self.crop_transforms(augment=False)
