"""``SwinUNETRPretrainTrainer`` (ResEnc) and ``PrimusSwinUNETRPretrainTrainer``: SwinUNETR-style pretraining.

Run as ``nnUNetv2_train ID 3d_fullres all -tr SwinUNETRPretrainTrainer -p nnsslPlans`` (or
``-tr PrimusSwinUNETRPretrainTrainer -p nnsslPlansPrimus``). Each sample gives two views of one crop, rotated by
k x 90 degrees and cut out; the network predicts the rotations, reconstructs the uncut views and pulls the two views'
embeddings together against the rest of the global batch (``nnssl.methods.swinunetr``).

* Views: the plans' patch (160^3 for both presets, as the reference); a patch whose (x, y) plane is not square gives
  square views of its smaller edge (a rotation must keep the shape). Plans whose patch is below 128 voxels on some
  axis (the tiny CPU presets, 64^3) get 32^3 views (``tiny_view_size``): a CPU step then costs about a fifth of a
  64^3 one. A Primus is built at the view size, which the adaptation plan records as the pretrain patch and the
  recommended downstream patch.
  The loader cuts exactly the view: no other spatial augmentation, as the reference (a mirrored crop rotated by k
  looks like the crop rotated by -k and mirrored, which would blur the rotation labels).
* Recipes: the ResEnc trainer the common pretraining recipe (SGD 1e-2, as the reference's ``SwinUNETRTrainer``), the
  Primus trainer ``PRIMUS_MAE_RECIPE`` (AdamW 3e-4, weight decay 5e-2, clipping at 1, warm-up: the reference's
  ``SwinUNETREvaTrainer``).
* Heads read the pooled bottleneck (``_tokenheads``: the reference's single positions). Only the stem and encoder are
  exported (``network_weights``); heads and reconstruction decoder stay in ``nnssl_pretraining_weights`` for resuming.
* The contrastive term needs a global batch of at least 2 samples: a smaller one is refused when the trainer is built.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnssl import citations
from nnssl.architectures import is_primus
from nnssl.errors import UserError
from nnssl.finetuning.adaptation_plan import build_adaptation_plan
from nnssl.integration.distributed import gather_from_all_ranks
from nnssl.methods.contrastive import DEFAULT_TEMPERATURE
from nnssl.methods.encoder_features import encoder_state_dict
from nnssl.methods.recipe import PRIMUS_MAE_RECIPE
from nnssl.methods.swinunetr import (CutoutConfig, SwinUNETRLossWeights, SwinUNETRModel, SwinUNETRViewTransform,
                                     square_view, split_views, swinunetr_loss_parts, unpack_view_targets,
                                     weighted_loss)
from nnssl.trainers.pretraining import nnsslPretrainTrainer
from nnssl.trainers.primus import check_primus_plans
from nnssl.trainers.variants import define_epoch_variants
from nnssl.trainers.voco import TINY_PLANS_PATCH_EDGE


def configuration_at_view_size(configuration: dict, view: Sequence[int]) -> dict:
    """The plans configuration with the view as its patch (and, for a Primus, as its input shape)."""
    configuration = copy.deepcopy(configuration)
    configuration["patch_size"] = list(view)
    architecture = configuration["architecture"]
    if is_primus(architecture["network_class_name"]):
        architecture["arch_kwargs"]["input_shape"] = list(view)
    return configuration


class SwinUNETRPretrainTrainer(nnsslPretrainTrainer):
    citations = citations.PRETRAINING_BASE + (citations.SWINUNETR,)
    loss_weights = SwinUNETRLossWeights()
    cutout = CutoutConfig()
    temperature = DEFAULT_TEMPERATURE
    pooled_heads = True
    tiny_view_size = (32, 32, 32)

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_plans()
        batch_size = self.configuration_manager.batch_size
        if batch_size < 2:
            raise UserError(f"{self.__class__.__name__}: the plans {self.plans_manager.plans_name} give batch_size "
                            f"{batch_size} for {configuration}, and a global batch of one sample is one view pair "
                            f"with no negative for the contrastive term. Set batch_size to 2 or more in the plans "
                            f"file (or plan again with nnssl_batch_size=2 or more).")
        self.view_size = self.select_view_size(self.configuration_manager.patch_size)
        # the loader cuts the view; the plans file stays untouched
        self.configuration_manager = ConfigurationManager(
            configuration_at_view_size(self.configuration_manager.configuration, self.view_size))
        self._loss_parts: List[Dict[str, float]] = []

    @classmethod
    def select_view_size(cls, plans_patch_size: Sequence[int]) -> Tuple[int, ...]:
        """``tiny_view_size`` for CPU/test presets, else the plans' patch made square in the rotation plane."""
        if min(plans_patch_size) < TINY_PLANS_PATCH_EDGE:
            return tuple(cls.tiny_view_size)
        return square_view(plans_patch_size)

    def check_plans(self) -> None:
        name = self.configuration_manager.network_arch_class_name
        if is_primus(name):
            raise UserError(f"{self.__class__.__name__} pretrains a U-Net, but the plans "
                            f"{self.plans_manager.plans_name} build a Primus ({name}). Use "
                            f"PrimusSwinUNETRPretrainTrainer for Primus plans.")

    def initialize(self):
        first_call = not self.was_initialized
        super().initialize()
        if first_call:
            self.print_to_log_file(f"SwinUNETR views of {list(self.view_size)} ({self.cutout}, loss weights "
                                   f"{self.loss_weights}, heads on the "
                                   f"{'pooled bottleneck' if self.pooled_heads else 'first bottleneck positions'})")

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return SwinUNETRModel(network, pooled_heads=self.pooled_heads)

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return encoder_state_dict(model.network)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """The loader cuts exactly the view: no spatial transform, so no rotation margin."""
        rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, tuple(self.view_size), mirror_axes

    # instance methods as VoCo's (nnU-Net calls them on the trainer): the cut-out settings are class attributes
    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        return SwinUNETRViewTransform(self.cutout)

    def get_validation_transforms(self, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None) -> BasicTransform:
        """The same random views as training (as the reference): the validation loss measures the same task."""
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
        cut = inputs[0, 0].float().cpu().numpy()
        return {
            f"input: view 1, rotated {90 * int(rotations[0])} degrees (the reconstruction target)":
                clean[0, 0].float().cpu().numpy(),
            f"cut-out input (what the encoder sees; {100 * masks[0].float().mean():.0f} % replaced)": cut,
            f"reconstruction (predicted rotation {90 * predicted} degrees)":
                output.reconstruction[0, 0].float().cpu().numpy(),
        }

    def adaptation_plan(self) -> dict:
        """The view is the pretrain patch and the recommended downstream patch (a Primus was built for it)."""
        plans = copy.deepcopy(self.plans_manager.plans)
        plans["configurations"][self.configuration_name] = self.configuration_manager.configuration
        return build_adaptation_plan(plans, self.configuration_name, self.num_input_channels, self.view_size)


class PrimusSwinUNETRPretrainTrainer(SwinUNETRPretrainTrainer):
    citations = (citations.NNUNET, citations.PRIMUS, citations.OPENMIND, citations.SWINUNETR)
    recipe = PRIMUS_MAE_RECIPE

    def check_plans(self) -> None:
        check_primus_plans(self.__class__.__name__, self.configuration_manager, None, self.plans_manager.plans_name,
                           resenc_trainer="SwinUNETRPretrainTrainer")


class SwinUNETRPretrainTrainer_tokenheads(SwinUNETRPretrainTrainer):
    """The reference's heads: the rotation head reads bottleneck position 0, the contrast head position 1."""

    pooled_heads = False


class PrimusSwinUNETRPretrainTrainer_tokenheads(PrimusSwinUNETRPretrainTrainer):
    """The reference's heads: the rotation head reads token 0, the contrast head token 1."""

    pooled_heads = False


for _trainer in (SwinUNETRPretrainTrainer, PrimusSwinUNETRPretrainTrainer):
    define_epoch_variants(_trainer, globals())
