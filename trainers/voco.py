"""``VoCoPretrainTrainer``: volume contrastive pretraining (VoCo) of the plans' dna encoder.

Run as ``nnUNetv2_train ID 3d_fullres all -tr VoCoPretrainTrainer -p nnsslPlans``. Each sample is a VoCo patch
(not the plans' patch) tiled into base crops plus random target crops; the encoder embeds every crop (globally
pooled stage outputs -> projector) and learns to predict target/base overlaps (see ``nnssl.methods.voco``).

Geometry: full-size plans train on OpenMind's patch (256,256,64) with a 4x4x1 grid of 64^3 base crops and 4 target
crops. When the plans' patch is below 128 voxels on some axis (the tiny CPU preset, 64^3), the tiny geometry is
used instead: patch (64,64,32), 2x2x1 grid of 32^3 crops, 4 targets, so a CPU step handles 2 x 8 small crops. Both
are class attributes (``geometry``, ``tiny_geometry``) that variants override.

Gradient clipping: kept at the base's norm 12 (the reference clips nothing). The positive term's gradient,
1 / (1 - |overlap - similarity| + 1e-6), reaches 1e6 when a target lying (almost) entirely in one base has a
non-positive similarity to it; clipping bounds such steps without affecting ordinary ones. ``_noclip`` restores the
reference behaviour.
"""

from dataclasses import replace
from typing import Dict, Optional

import torch
from torch import nn
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from nnssl import citations
from nnssl.integration.checkpoint import unwrap
from nnssl.methods.encoder_features import is_primus_network
from nnssl.trainers.crop_pretext import CropPretextTrainer
from nnssl.trainers.variants import define_epoch_variants
from nnssl.methods.voco import VoCoGeometry, VoCoModel, voco_prediction_loss, voco_regularisation_loss, voco_transforms


class VoCoPretrainTrainer(CropPretextTrainer):
    citations = citations.PRETRAINING_BASE + (citations.VOCO,)
    geometry = VoCoGeometry(patch_size=(256, 256, 64), base_crop_count=(4, 4, 1), target_crop_count=4)
    tiny_geometry = VoCoGeometry(patch_size=(64, 64, 32), base_crop_count=(2, 2, 1), target_crop_count=4)
    prediction_loss_weight = 1.0
    regularisation_loss_weight = 1.0
    teacher_momentum: Optional[float] = None  # EMA decay per step of the teacher that embeds the bases (None: none)

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return VoCoModel(network if is_primus_network(network) else network.encoder,
                         teacher_momentum=self.teacher_momentum)

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return model.transferable_state_dict()

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self.teacher_momentum is not None:
            unwrap(self.network).update_teacher()
        return result

    def crop_transforms(self, augment: bool) -> BasicTransform:
        return voco_transforms(self.crop_geometry, augment)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        crops = batch["data"].to(self.device, non_blocking=True)  # (B, n_base + n_target, C, *crop)
        overlaps = batch["target"].to(self.device, non_blocking=True)  # (B, n_target, n_base)
        batch_size, n_crops = crops.shape[:2]
        embeddings = self.network(crops.flatten(0, 1)).view(batch_size, n_crops, -1)
        n_base = self.crop_geometry.num_base_crops
        base, target = embeddings[:, :n_base], embeddings[:, n_base:]
        prototypes = base
        if self.teacher_momentum is not None:
            prototypes = unwrap(self.network).teacher_embeddings(crops[:, :n_base].flatten(0, 1)) \
                .view(batch_size, n_base, -1)
        return (self.prediction_loss_weight * voco_prediction_loss(target, prototypes, overlaps)
                + self.regularisation_loss_weight * voco_regularisation_loss(base))

class VoCoPretrainTrainer_noclip(VoCoPretrainTrainer):
    """No gradient clipping, as the reference VoCo trainer."""

    recipe = replace(VoCoPretrainTrainer.recipe, gradient_clip_norm=None)


class VoCoPretrainTrainer_momentum(VoCoPretrainTrainer):
    """Base crops of the prediction loss embedded by a momentum (EMA) teacher of encoder and projector, updated
    after every step with decay ``teacher_momentum``, as the original VoCo (the reference has no teacher)."""

    teacher_momentum = 0.99


class VoCoPretrainTrainer_3x3x1(VoCoPretrainTrainer):
    """The OpenMind paper's configuration (Appendix A.3): patch (192,192,64), 3x3x1 grid of 64^3 crops, 5 targets."""

    geometry = VoCoGeometry(patch_size=(192, 192, 64), base_crop_count=(3, 3, 1), target_crop_count=5)


for _trainer in (VoCoPretrainTrainer, VoCoPretrainTrainer_momentum):
    define_epoch_variants(_trainer, globals())
