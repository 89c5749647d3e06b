"""``VolumeFusionPretrainTrainer``: segment the fusion class of every voxel of two box-wise fused patches.

Run as ``nnUNetv2_train ID 3d_fullres all -tr VolumeFusionPretrainTrainer -p nnsslPlans`` (``_K3``, ``_K9``: 3 or 9
fusion classes instead of 5). Fusion and loss follow the reference (§5.3; ``nnssl.methods.volume_fusion``): Dice + CE
(nnU-Net's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, per-sample Dice including class 0, smooth
1e-5, weights 1 and 1) on a dna U-Net with K output channels.

Pairing: nnU-Net's loader draws twice the plans' batch size; the first half are foregrounds, the second half
backgrounds, fused into one batch of the plans' size in the train step. This keeps every pair made of two
independent random patches, as the reference's 2B-patch loader does, at the reference's cost of loading 2B patches.
(Pairing each sample with a rolled copy of the batch would halve the loading, but with the default batch of 2 both
fused samples would mix the same two patches, and a batch of 1 would fuse a patch with itself.)

Augmentation: nnU-Net's own intensity augmentations and mirroring, applied per patch before fusion (the reference's
list: noise, blur, brightness, contrast, low resolution with p 0.25, two gamma transforms, mirroring), without its
spatial transform; validation patches are only fused. Crops are random (the reference takes the central crop).

Export: ``network_weights`` is the whole U-Net under standard dna keys. Its ``decoder.seg_layers.*`` hold the
K-channel pseudo-segmentation head: not transferable. Downstream fine-tuning copies the stem and encoder by prefix
(``nnssl_adaptation_plan``: ``encoder.stem``, ``encoder.stages``), and nnU-Net's ``-pretrained_weights`` skips
``.seg_layers.`` keys, so the head never reaches a downstream model.
"""

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl import citations
from nnssl.methods.volume_fusion import VolumeFusionConfig, VolumeFusionTransform, volume_fusion_loss
from nnssl.trainers.patch_pretext import PatchPretextTrainer
from nnssl.trainers.variants import define_epoch_variants



class VolumeFusionPretrainTrainer(PatchPretextTrainer):
    citations = citations.PRETRAINING_BASE + (citations.VOLUME_FUSION,)
    fusion_config = VolumeFusionConfig()

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.fusion = VolumeFusionTransform(self.fusion_config, np.random.default_rng())

    def num_output_channels(self, num_input_channels: int) -> int:
        return self.fusion_config.num_classes

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.print_to_log_file(f"VolumeFusion: the loader draws {self.batch_size} foreground + {self.batch_size} "
                               f"background patches per fused batch of {self.batch_size}")
        self.batch_size *= 2

    def _build_loss(self):
        return volume_fusion_loss(self.is_ddp)

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's default pipeline minus its spatial transform (no deep-supervision or region steps either)."""
        stock = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, None, mirror_axes, False,
                                                      use_mask_for_norm)
        return ComposeTransforms([t for t in stock.transforms if not isinstance(t, SpatialTransform)])

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        fused = self.fusion(image=batch["data"].to(self.device, non_blocking=True))
        return self.loss(self.network(fused["image"]), fused["segmentation"])


class VolumeFusionPretrainTrainer_K3(VolumeFusionPretrainTrainer):
    fusion_config = VolumeFusionConfig(num_classes=3)


class VolumeFusionPretrainTrainer_K9(VolumeFusionPretrainTrainer):
    fusion_config = VolumeFusionConfig(num_classes=9)


define_epoch_variants(VolumeFusionPretrainTrainer, globals())
