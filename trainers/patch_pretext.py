"""The base of pretext tasks that train the plain dna U-Net on random crops of exactly the patch size."""

from typing import Dict

import torch
from torch import nn

from nnssl.trainers.pretraining import nnsslPretrainTrainer


class PatchPretextTrainer(nnsslPretrainTrainer):
    """Base of pretext tasks solved by the plain dna U-Net on random crops of exactly the patch size.

    Models Genesis and VolumeFusion use no spatial augmentation in the reference, so the loader crops the patch
    size directly instead of the larger rotation margin. The pretraining model is the dna network itself.
    """

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return network

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return model.state_dict()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, tuple(self.configuration_manager.patch_size), mirror_axes
