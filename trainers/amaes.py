"""``AMAESPretrainTrainer`` (augmented masked autoencoder) and ``S3DPretrainTrainer_amaesaug`` (S3D + reversal).

Run as ``nnUNetv2_train ID 3d_fullres all -tr AMAESPretrainTrainer -p nnsslPlans``. Both share the augmentation
reversal of ``nnssl.methods.amaes``: spatial augmentation on input and target alike, intensity/artefact augmentation on
the input only, the clean target carried through nnU-Net's loader as extra image channels.

* AMAES: 4^3-voxel tokens masked at a fixed ratio 0.6 (exactly int(0.6 N) tokens per sample instead of the paper's
  independent p = 0.6 per token: same expectation, no variance in the ratio), the zero-masked input through the plans'
  dna encoder (dense) and a light-weight decoder without skips, MSE over all voxels; only ``encoder.*`` is exported.
  The optimisation recipe is nnssl's common one (SGD, poly, clipping at 12), as OpenMind does for every baseline.
* S3D with augmentation reversal: S3D unchanged (sparse encoder, densification, full decoder, MSE on masked voxels,
  full dna network exported) except that the input is degraded and the loss target is the clean image.
"""

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnssl import citations
from nnssl.methods.encoder_features import encoder_only_state_dict
from nnssl.methods.amaes import (AMAESModel, CarryCleanTarget, augmentation_reversal_loss,
                                 augmentation_reversal_transforms, split_input_and_target)
from nnssl.methods.masking import MaskingConfig, upsample_mask
from nnssl.methods.reconstruction_loss import masked_reconstruction_loss
from nnssl.trainers.s3d import S3DPretrainTrainer
from nnssl.trainers.variants import define_epoch_variants


class AugmentationReversalMixin:
    """Reversal target for S3D-family trainers (``mask_sampler``, ``loss_region``, ``network(x, mask)``).

    The whole augmentation stays in the CPU workers: the input-only augmentations follow the spatial ones there.
    """

    spatial_augmentation_on_device = False

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        return augmentation_reversal_transforms(patch_size, rotation_for_DA, mirror_axes)

    @staticmethod
    def get_validation_transforms(deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None) -> BasicTransform:
        """nnU-Net's validation transforms plus the (un-augmented) target copy, so batches keep one layout."""
        stock = nnUNetTrainer.get_validation_transforms(deep_supervision_scales, is_cascaded, foreground_labels,
                                                        regions, ignore_label)
        return ComposeTransforms([stock, CarryCleanTarget(None)])

    def reconstruction_loss(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            region: Optional[torch.Tensor]) -> torch.Tensor:
        """S3D's objective: MSE over the masked voxels."""
        return masked_reconstruction_loss(prediction, target, mask, region)

    def _reverse(self, batch: dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(degraded input, clean target, mask, reconstruction) of a batch."""
        data = batch["data"].to(self.device, non_blocking=True)
        inputs, target = split_input_and_target(data, self.num_input_channels)
        mask = self.mask_sampler.sample(inputs.shape[0], self.device)
        return inputs, target, mask, self.network(inputs, mask)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        _, target, mask, prediction = self._reverse(batch)
        return self.reconstruction_loss(prediction, target, mask, self.batch_loss_region(batch))

    def reconstruction_panels(self, batch: dict) -> Optional[Dict[str, np.ndarray]]:
        inputs, target, mask, prediction = self._reverse(batch)
        visible = upsample_mask(mask, inputs.shape[2:])[0, 0].cpu().numpy() > 0
        image = inputs[0, 0].float().cpu().numpy()
        return {
            "input (augmented)": image,
            "masked input (what the encoder sees)": np.where(visible, image, 0),
            "reconstruction": prediction[0, 0].float().cpu().numpy(),
            "clean target (spatial augmentation only)": target[0, 0].float().cpu().numpy(),
        }


class AMAESPretrainTrainer(AugmentationReversalMixin, S3DPretrainTrainer):
    citations = citations.PRETRAINING_BASE + (citations.AMAES, citations.MAE)
    masking = MaskingConfig(block_size=4, ratio_range=(0.6, 0.6))

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return AMAESModel(network)

    def reconstruction_loss(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            region: Optional[torch.Tensor]) -> torch.Tensor:
        """AMAES' objective: MSE over every voxel, masked and visible (see ``augmentation_reversal_loss``)."""
        return augmentation_reversal_loss(prediction, target, region)

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return encoder_only_state_dict(model)


class S3DPretrainTrainer_amaesaug(AugmentationReversalMixin, S3DPretrainTrainer):
    """S3D (sparse masking, masked-voxel MSE) trained to reverse the AMAES input augmentations."""

    citations = S3DPretrainTrainer.citations + (citations.AMAES,)


for _trainer in (AMAESPretrainTrainer, S3DPretrainTrainer_amaesaug):
    define_epoch_variants(_trainer, globals())
