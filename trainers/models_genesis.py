"""``ModelsGenesisPretrainTrainer``: restore the clean patch from its Models Genesis corruption, MSE over the patch.

Run as ``nnUNetv2_train ID 3d_fullres all -tr ModelsGenesisPretrainTrainer -p nnsslPlans``. The corruption (see
``nnssl.methods.models_genesis``) runs per sample in nnU-Net's augmentation workers, for training and validation alike
(as the reference); the batch's ``data`` is the corrupted patch and its ``target`` the clean one. The network is the
plans' dna U-Net with one linear output channel per input channel; ``network_weights`` is that whole U-Net under
standard dna keys, of which fine-tuning transfers the stem and encoder.
"""

from typing import Dict, Tuple

import numpy as np
import torch

from nnssl import citations
from nnssl.methods.models_genesis import ModelsGenesisTransform, restoration_loss
from nnssl.trainers.patch_pretext import PatchPretextTrainer
from nnssl.trainers.variants import define_epoch_variants


class ModelsGenesisPretrainTrainer(PatchPretextTrainer):
    citations = citations.PRETRAINING_BASE + (citations.MODELS_GENESIS,)

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        return ModelsGenesisTransform()

    @staticmethod
    def get_validation_transforms(deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None):
        return ModelsGenesisTransform()

    def _restore(self, batch: dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        corrupted = batch["data"].to(self.device, non_blocking=True)
        clean = batch["target"].to(self.device, non_blocking=True)
        return corrupted, clean, self.network(corrupted)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        _, clean, restored = self._restore(batch)
        return restoration_loss(restored, clean)

    def reconstruction_panels(self, batch: dict) -> Dict[str, np.ndarray]:
        corrupted, clean, restored = self._restore(batch)
        return {
            "target (clean patch)": clean[0, 0].float().cpu().numpy(),
            "input (corrupted)": corrupted[0, 0].float().cpu().numpy(),
            "restoration": restored[0, 0].float().cpu().numpy(),
        }


define_epoch_variants(ModelsGenesisPretrainTrainer, globals())
