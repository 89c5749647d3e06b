"""``SwinUNETRPretrainTrainer`` (ResEnc) and ``PrimusSwinUNETRPretrainTrainer``: SwinUNETR-style pretraining.

Run as ``nnUNetv2_train ID 3d_fullres all -tr SwinUNETRPretrainTrainer -p nnsslPlans`` (or
``-tr PrimusSwinUNETRPretrainTrainer -p nnsslPlansPrimus``). Each sample gives two views of one crop, rotated by
k x 90 degrees and cut out; the network predicts the rotations, reconstructs the uncut views and pulls the two views'
embeddings together against the rest of the global batch (``nnssl.methods.swinunetr``).

* Views: the plans' patch (160^3 for both presets, as the reference); a patch whose (x, y) plane is not square gives
  square views of its smaller edge (a rotation must keep the shape). Plans whose patch is below 128 voxels on some
  axis (the tiny CPU presets, 64^3) get 32^3 views (``tiny_geometry``): forward and backward of the tiny ResEnc on 4
  views took 1.1 s at 32^3 and 6.9 s at 64^3 on the 2-core CPU test machine. The network is built at the view size
  (a Primus's positional embedding fits one input shape), and the adaptation plan records the view as the pretrain
  patch and the recommended downstream patch (``CropPretextTrainer``). The loader cuts exactly the view: no other
  spatial augmentation, as the reference (a mirrored crop rotated by k looks like the crop rotated by -k and
  mirrored, which would blur the rotation labels).
* Recipes: the ResEnc trainer the common pretraining recipe (SGD 1e-2, as the reference's ``SwinUNETRTrainer``), the
  Primus trainer ``PRIMUS_MAE_RECIPE`` (AdamW 3e-4, weight decay 5e-2, clipping at 1, warm-up: the reference's
  ``SwinUNETREvaTrainer``).
* Heads read the pooled bottleneck (``_tokenheads``: the reference's single positions). Only the stem and encoder are
  exported (``network_weights``); heads and reconstruction decoder stay in ``nnssl_pretraining_weights`` for resuming.
* The contrastive term needs a global batch of at least 2 samples: a smaller one is refused when the trainer is built.
"""

from typing import Dict, List, Optional

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from torch import nn

from nnssl import citations
from nnssl.integration.distributed import gather_from_all_ranks
from nnssl.methods.contrastive import DEFAULT_TEMPERATURE
from nnssl.methods.encoder_features import encoder_state_dict
from nnssl.methods.swinunetr import (CutoutConfig, SwinUNETRGeometry, SwinUNETRLossWeights, SwinUNETRModel,
                                     SwinUNETRViewTransform, split_views, swinunetr_loss_parts, unpack_view_targets,
                                     weighted_loss)
from nnssl.trainers.crop_pretext import TINY_PLANS_PATCH_EDGE, CropPretextTrainer
from nnssl.trainers.primus import PrimusPretraining, require_unet_plans
from nnssl.trainers.simclr import check_contrastive_batch_size
from nnssl.trainers.variants import define_epoch_variants


class SwinUNETRPretrainTrainer(CropPretextTrainer):
    citations = citations.PRETRAINING_BASE + (citations.SWINUNETR,)
    tiny_geometry = SwinUNETRGeometry((32, 32, 32))
    loss_weights = SwinUNETRLossWeights()
    cutout = CutoutConfig()
    temperature = DEFAULT_TEMPERATURE
    pooled_heads = True

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_contrastive_batch_size(self.__class__.__name__, self.configuration_manager.batch_size,
                                     self.plans_manager.plans_name, configuration)
        self.view_size = self.crop_geometry.view_size
        self._loss_parts: List[Dict[str, float]] = []

    @classmethod
    def select_geometry(cls, plans_patch_size) -> SwinUNETRGeometry:
        """``tiny_geometry`` for CPU/test presets, else the plans' patch made square in the rotation plane."""
        if min(plans_patch_size) < TINY_PLANS_PATCH_EDGE:
            return cls.tiny_geometry
        return SwinUNETRGeometry.square(plans_patch_size)

    def check_plans(self) -> None:
        require_unet_plans(self.__class__.__name__, self.configuration_manager, self.plans_manager.plans_name,
                           "PrimusSwinUNETRPretrainTrainer")

    def initialize(self):
        first_call = not self.was_initialized
        super().initialize()
        if first_call:
            self.print_to_log_file(f"SwinUNETR: {self.cutout}, {self.loss_weights}, heads on the "
                                   f"{'pooled bottleneck' if self.pooled_heads else 'bottleneck positions 0 and 1'}")

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return SwinUNETRModel(network, pooled_heads=self.pooled_heads)

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return encoder_state_dict(model.network)

    def crop_transforms(self, augment: bool) -> BasicTransform:
        """Random views for validation too (as the reference): the validation loss measures the same task."""
        return SwinUNETRViewTransform(self.cutout)

    def _views(self, batch: dict):
        """(cut-out inputs, clean targets, rotation labels, cut-out masks), views sample by sample, on the device."""
        inputs, clean = split_views(batch["data"].to(self.device, non_blocking=True))
        rotations, masks = unpack_view_targets(batch["target"].to(self.device, non_blocking=True), self.view_size)
        return inputs, clean, rotations.flatten(), masks.flatten(0, 1)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        inputs, clean, rotations, _ = self._views(batch)
        parts = swinunetr_loss_parts(self.network(inputs), rotations, clean, self.temperature)
        if train:
            self._loss_parts.append({name: float(value.detach()) for name, value in parts.items()})
        return weighted_loss(parts, self.loss_weights)

    def on_train_epoch_start(self):
        self._loss_parts = []
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        parts = [p for rank in gather_from_all_ranks(self._loss_parts) for p in rank]
        if parts:
            means = {name: np.nanmean([p[name] for p in parts]) for name in parts[0]}
            self.print_to_log_file("train loss parts: " + ", ".join(f"{n} {v:.4f}" for n, v in means.items()))

    def reconstruction_panels(self, batch: dict) -> Optional[Dict[str, np.ndarray]]:
        inputs, clean, rotations, masks = self._views(batch)
        output = self.network(inputs)
        predicted = int(output.rotation_logits[0].argmax())
        return {
            f"input: view 1, rotated {90 * int(rotations[0])} degrees (the reconstruction target)":
                clean[0, 0].float().cpu().numpy(),
            f"cut-out input (what the encoder sees; {100 * masks[0].float().mean():.0f} % replaced)":
                inputs[0, 0].float().cpu().numpy(),
            f"reconstruction (predicted rotation {90 * predicted} degrees)":
                output.reconstruction[0, 0].float().cpu().numpy(),
        }


class PrimusSwinUNETRPretrainTrainer(PrimusPretraining, SwinUNETRPretrainTrainer):
    citations = (citations.NNUNET, citations.PRIMUS, citations.OPENMIND, citations.SWINUNETR)
    resenc_trainer = "SwinUNETRPretrainTrainer"


class SwinUNETRPretrainTrainer_tokenheads(SwinUNETRPretrainTrainer):
    """The reference's heads: the rotation head reads bottleneck position 0, the contrast head position 1."""

    pooled_heads = False


class PrimusSwinUNETRPretrainTrainer_tokenheads(PrimusSwinUNETRPretrainTrainer):
    """The reference's heads: the rotation head reads token 0, the contrast head token 1."""

    pooled_heads = False


for _trainer in (SwinUNETRPretrainTrainer, PrimusSwinUNETRPretrainTrainer):
    define_epoch_variants(_trainer, globals())
