"""``SimCLRPretrainTrainer`` (ResEnc plans) and ``PrimusSimCLRPretrainTrainer`` (Primus plans): SimCLR pretraining.

Run as ``nnUNetv2_train ID 3d_fullres all -tr SimCLRPretrainTrainer -p nnsslPlans`` (or
``-tr PrimusSimCLRPretrainTrainer -p nnsslPlansPrimus``). Each sample is a SimCLR patch (192,192,64) from which two
64^3 views overlapping by at least half the crop per axis are cut and augmented on their own; every view is embedded
(pooled encoder features -> projector) and NT-Xent (temperature 0.5, negatives from every DDP rank) contrasts them
(see ``nnssl.methods.simclr``). On the tiny CPU presets the patch is (64,64,32) with 32^3 views.

Recipes, as the reference's trainers: the ResEnc trainer uses the S3D/OpenMind SGD recipe but clips the gradient
norm at 0.1 (the reference's SimCLRTrainer does); the Primus trainer uses the Primus MAE recipe (AdamW 3e-4, weight
decay 5e-2, clipping at 1, 5 % linear warm-up, poly), as the reference's SimCLREvaTrainer. The network (a Primus
included) is built for the 64^3 views, and the checkpoint recommends that patch downstream.
"""

from dataclasses import replace
from typing import Dict

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from torch import nn

from nnssl import citations
from nnssl.errors import UserError
from nnssl.methods.contrastive import DEFAULT_TEMPERATURE, nt_xent_loss
from nnssl.methods.encoder_features import encoder_state_dict
from nnssl.methods.recipe import PRETRAIN_RECIPE
from nnssl.methods.simclr import NUM_VIEWS, SimCLRGeometry, SimCLRModel, simclr_transforms
from nnssl.trainers.crop_pretext import CropPretextTrainer
from nnssl.trainers.primus import PrimusPretraining, require_unet_plans
from nnssl.trainers.variants import define_epoch_variants


def check_contrastive_batch_size(trainer_name: str, batch_size: int, plans_name: str, configuration: str) -> None:
    """NT-Xent contrasts each sample's views with the other samples' views: one sample in the global batch (all
    ranks together) has no negative."""
    if batch_size < 2:
        raise UserError(f"{trainer_name} needs at least 2 samples in the global batch (NT-Xent contrasts each sample "
                        f"with the others), but the plans {plans_name} have batch_size {batch_size} in "
                        f"configuration {configuration}. Set \"batch_size\" to 2 or more there (the plans file "
                        f"{plans_name}.json in the dataset's nnUNet_preprocessed folder), or train with other plans.")


class SimCLRPretrainTrainer(CropPretextTrainer):
    citations = citations.PRETRAINING_BASE + (citations.SIMCLR,)
    recipe = replace(PRETRAIN_RECIPE, gradient_clip_norm=0.1)
    geometry = SimCLRGeometry(patch_size=(192, 192, 64), crop_size=(64, 64, 64), min_overlap=0.5)
    tiny_geometry = SimCLRGeometry(patch_size=(64, 64, 32), crop_size=(32, 32, 32), min_overlap=0.5)
    temperature = DEFAULT_TEMPERATURE

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_contrastive_batch_size(self.__class__.__name__, self.configuration_manager.batch_size,
                                     self.plans_manager.plans_name, configuration)

    def check_plans(self) -> None:
        require_unet_plans(self.__class__.__name__, self.configuration_manager, self.plans_manager.plans_name,
                           "PrimusSimCLRPretrainTrainer")

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return SimCLRModel(network)

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return encoder_state_dict(model.network)

    def crop_transforms(self, augment: bool) -> BasicTransform:
        return simclr_transforms(self.crop_geometry, augment)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        views = batch["data"].to(self.device, non_blocking=True)  # (B, 2, C, *crop)
        embeddings = self.network(views.flatten(0, 1)).view(views.shape[0], NUM_VIEWS, -1)
        return nt_xent_loss(embeddings[:, 0], embeddings[:, 1], self.temperature)


class SimCLRPretrainTrainer_t01(SimCLRPretrainTrainer):
    """NT-Xent temperature 0.1 (SimCLR's paper: lower temperatures suit larger batches)."""

    temperature = 0.1


class PrimusSimCLRPretrainTrainer(PrimusPretraining, SimCLRPretrainTrainer):
    citations = (citations.NNUNET, citations.PRIMUS, citations.OPENMIND, citations.SIMCLR)
    resenc_trainer = "SimCLRPretrainTrainer"


class PrimusSimCLRPretrainTrainer_t01(PrimusSimCLRPretrainTrainer):
    """NT-Xent temperature 0.1."""

    temperature = 0.1


for _trainer in (SimCLRPretrainTrainer, PrimusSimCLRPretrainTrainer):
    define_epoch_variants(_trainer, globals())
