"""Warm-up fine-tuning trainers for a downstream dataset planned with ``nnssl_prepare_finetune``.

``nnUNetv2_train ID 3d_fullres FOLD -tr nnsslFinetuneTrainer -p nnsslFinetunePlans``. The pretrained checkpoint is
the one recorded in the plans (``nnssl_pretrained.checkpoint``) or, overriding it, the ``nnssl_pretrained_checkpoint``
environment variable. Stem and encoder are transferred by the adaptation plan's prefixes, the decoder starts fresh.
Each trainer is one ``FinetuneRecipe`` (``nnssl/finetuning/recipe.py``); the README's fine-tuning table lists them and
the measurements that chose the default. On Primus plans a trainer uses its ``primus_recipe`` instead (nnU-Net's
Primus schedule for ``nnsslFinetuneTrainer``, its from-scratch twin for ``_scratch``); trainers whose recipe is
U-Net specific have none and refuse Primus plans.
"""

import os
from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl import citations
from nnssl.architectures import is_primus, network_from_configuration, transferable_prefixes
from nnssl.errors import UserError
from nnssl.finetuning.adaptation_plan import is_primus_plan
from nnssl.integration.checkpoint import unwrap
from nnssl.integration.environment import text_from_environment
from nnssl.integration.patching import replaced_attribute
from nnssl.finetuning.augmentation import spatial_only_training_transforms
from nnssl.finetuning.dynamic_transfer import DynamicTransferReport, dynamic_transfer
from nnssl.finetuning.recipe import DEFAULT_RECIPE, PAPER_RECIPE, PRIMUS_RECIPE, FinetuneRecipe
from nnssl.finetuning.schedule import FinetuneSchedule
from nnssl.finetuning.transfer import (PretrainedWeightsError, check_same_family, load_pretrained_checkpoint,
                                      transfer_pretrained_weights)
from nnssl.optimizer import recipe_optimizer
from nnssl.trainers.base import nnsslTrainerMixin
from nnssl.trainers.pretraining import freeze_unused_deep_supervision_heads
from nnssl.trainers.variants import define_epoch_variants

CHECKPOINT_VARIABLE = "nnssl_pretrained_checkpoint"


class FinetuneLRController:
    """Stands in for nnU-Net's per-epoch LR scheduler and sets both parameter groups' LR every iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: FinetuneSchedule, iterations_per_epoch: int):
        self.optimizer = optimizer
        self.schedule = schedule
        self.iterations_per_epoch = iterations_per_epoch

    def set(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            lr_of = self.schedule.encoder_lr if group["nnssl_part"] == "encoder" else self.schedule.lr
            group["lr"] = lr_of(step)

    def step(self, epoch: int) -> None:  # nnU-Net calls this at every epoch start
        self.set(epoch * self.iterations_per_epoch)


class nnsslFinetuneTrainer(nnsslTrainerMixin, nnUNetTrainer):
    recipe: FinetuneRecipe = DEFAULT_RECIPE
    primus_recipe: Optional[FinetuneRecipe] = PRIMUS_RECIPE

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe = self.recipe_for_plans()
        self.initial_lr = self.recipe.peak_lr  # what nnU-Net's own code (logging, plots) reads
        self.weight_decay = self.recipe.weight_decay
        self.num_epochs = self.recipe.num_epochs
        self.enable_deep_supervision = self.recipe.deep_supervision
        self.schedule: Optional[FinetuneSchedule] = None

    def recipe_for_plans(self) -> FinetuneRecipe:
        """``recipe`` for U-Net plans, ``primus_recipe`` for Primus plans."""
        network_class = self.configuration_manager.network_arch_class_name
        if not is_primus(network_class):
            return self.recipe
        if self.primus_recipe is None:
            raise UserError(f"{self.__class__.__name__} is a U-Net recipe and the plans "
                            f"{self.plans_manager.plans_name} build a Primus; fine-tune a Primus with "
                            f"nnsslFinetuneTrainer (nnU-Net's Primus schedule) or nnsslFinetuneTrainer_scratch.")
        return self.primus_recipe

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's network from the plans, Primus included (also what ``nnUNetv2_predict`` builds)."""
        return network_from_configuration(configuration_manager, num_input_channels, num_output_channels,
                                          enable_deep_supervision)

    def set_deep_supervision_enabled(self, enabled: bool):
        """A Primus has no U-Net decoder to switch (and never deep supervision)."""
        if hasattr(unwrap(self.network), "decoder"):
            super().set_deep_supervision_enabled(enabled)

    @property
    def global_step(self) -> int:
        """The iteration being run (the training loop sets ``iteration_in_epoch``, a resumed one included)."""
        return self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        self.schedule = FinetuneSchedule(self.recipe, self.num_epochs * self.num_iterations_per_epoch)
        network = unwrap(self.network)
        if not self.recipe.deep_supervision:
            freeze_unused_deep_supervision_heads(network)
        encoder_ids = {id(p) for prefix in transferable_prefixes(network)
                       for p in network.get_submodule(prefix).parameters()}
        # decoder group first: nnU-Net logs and plots param_groups[0]'s LR, i.e. the schedule's LR
        groups = [
            {"params": [p for p in network.parameters() if id(p) not in encoder_ids], "nnssl_part": "decoder"},
            {"params": [p for p in network.parameters() if id(p) in encoder_ids], "nnssl_part": "encoder"},
        ]
        optimizer = recipe_optimizer(groups, self.recipe.optimizer, self.recipe.peak_lr, self.weight_decay,
                                     betas=self.recipe.adamw_betas, amsgrad=self.recipe.amsgrad)
        self.print_to_log_file(f"Fine-tuning ({self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations): {self.schedule.describe()}")
        return optimizer, FinetuneLRController(optimizer, self.schedule, self.num_iterations_per_epoch)

    def _reset_encoder_optimizer_state(self) -> None:
        """Momentum gathered while the encoder was frozen (LR 0) must not hit it when it starts to learn."""
        for group in self.optimizer.param_groups:
            if group["nnssl_part"] == "encoder":
                for parameter in group["params"]:
                    self.optimizer.state.pop(parameter, None)
        self.print_to_log_file(f"Encoder unfrozen at iteration {self.global_step}: whole-network warm-up starts")

    def train_step(self, batch: dict) -> dict:
        if self.global_step == self.schedule.unfreeze_step:
            self._reset_encoder_optimizer_state()
        self.lr_scheduler.set(self.global_step)
        with replaced_attribute(torch.nn.utils, "clip_grad_norm_", self._clip_at_recipe_norm):
            return super().train_step(batch)

    def _clip_at_recipe_norm(self, parameters, _nnunet_max_norm, *args, **kwargs):
        """nnU-Net's train_step clips at a hard-coded 12; the recipe's norm replaces it (1 for Primus)."""
        return _CLIP_GRAD_NORM(parameters, self.recipe.gradient_clip_norm, *args, **kwargs)

    def get_training_transforms(self, *args, **kwargs):
        if self.recipe.spatial_only_augmentation:
            return spatial_only_training_transforms(*args, **kwargs)
        return nnUNetTrainer.get_training_transforms(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ weights
    def pretrained_checkpoint_path(self) -> Optional[str]:
        recorded = self.plans_manager.plans.get("nnssl_pretrained", {}).get("checkpoint")
        return text_from_environment(CHECKPOINT_VARIABLE) or recorded

    def on_train_start(self):
        """The pretrained weights are read once, at the start of a fresh training: a run resumed with ``--c`` (or
        validated with ``--val``) restores its own checkpoint and never needs the pretrained file again."""
        if not self.was_initialized:
            self.initialize()
        if self.recipe.loads_pretrained and self.nnssl_resumed_from is None:
            self._load_pretrained_weights()
        super().on_train_start()

    def _load_pretrained_weights(self) -> None:
        path = self.pretrained_checkpoint_path()
        if not path:
            raise PretrainedWeightsError(
                f"{self.__class__.__name__} needs a pretrained checkpoint: plan the dataset with "
                f"'nnssl_prepare_finetune -d ID -c CHECKPOINT' (recorded in the plans) or set {CHECKPOINT_VARIABLE}."
                f" For training from scratch with the same recipe use nnsslFinetuneTrainer_scratch.")
        checkpoint = load_pretrained_checkpoint(path)
        plan = checkpoint.get("nnssl_adaptation_plan") or self.plans_manager.plans.get("nnssl_pretrained") or {}
        check_same_family(plan, self.configuration_manager.network_arch_class_name, self.plans_manager.plans_name,
                          path)
        if self.plans_manager.plans.get("nnssl_pretrained", {}).get("architecture") == "dynamic":
            report = self._dynamic_transfer(checkpoint, plan, path)
        else:
            report = transfer_pretrained_weights(unwrap(self.network), checkpoint["network_weights"], plan,
                                                 self.recipe.transfer_parts, source=os.path.basename(path),
                                                 patch_size=self.configuration_manager.patch_size)
        self.print_to_log_file(f"Pretrained weights from {path} ({checkpoint.get('trainer_name', 'unknown trainer')}):")
        for line in report.lines():
            self.print_to_log_file("  " + line)
        references = [*(checkpoint.get("citations") or []),
                      *citations.checkpoint_entries([citations.PRIMUS if is_primus_plan(plan) else citations.S3D,
                                                     citations.NNUNET])]
        self.print_to_log_file("Please cite:\n  " + "\n  ".join(citations.apa_lines(references)))

    def _dynamic_transfer(self, checkpoint: dict, adaptation_plan: dict, path: str) -> DynamicTransferReport:
        """Plans from ``nnssl_prepare_finetune --architecture dynamic``: load what fits by name and shape."""
        if "decoder" in self.recipe.transfer_parts:
            raise UserError(f"{self.__class__.__name__} transfers the pretrained decoder, but the plans "
                            f"{self.plans_manager.plans_name} were made with --architecture dynamic, whose decoder "
                            f"stages need not correspond to the checkpoint's. Fine-tune them with a trainer that "
                            f"transfers stem and encoder (e.g. nnsslFinetuneTrainer), or plan with the pretrained "
                            f"architecture.")
        return dynamic_transfer(unwrap(self.network), checkpoint["network_weights"], adaptation_plan,
                                source=os.path.basename(path))


_CLIP_GRAD_NORM = torch.nn.utils.clip_grad_norm_


class nnsslFinetuneTrainer_paper(nnsslFinetuneTrainer):
    """The S3D paper's best full-length recipe: peak LR 1e-3, deep supervision off, 5 % + 5 % warm-ups."""

    recipe = PAPER_RECIPE
    primus_recipe = None


class nnsslFinetuneTrainer_DS(nnsslFinetuneTrainer):
    """The default with deep supervision on (the default until paired runs chose it off)."""

    recipe = replace(DEFAULT_RECIPE, deep_supervision=True)
    primus_recipe = None


class nnsslFinetuneTrainer_DS_lr1e3(nnsslFinetuneTrainer):
    """Deep supervision on at peak LR 1e-3 (with ``_DS``, ``_paper`` and the default: LR x deep supervision)."""

    recipe = replace(DEFAULT_RECIPE, deep_supervision=True, peak_lr=1e-3)
    primus_recipe = None


class nnsslFinetuneTrainer_singlewarmup(nnsslFinetuneTrainer):
    """One whole-network warm-up, then decay (nnU-Net's nnssl ``PretrainedTrainer`` shape)."""

    recipe = replace(DEFAULT_RECIPE, decoder_warmup_fraction=0.0)
    primus_recipe = None


class nnsslFinetuneTrainer_nowarmup(nnsslFinetuneTrainer):
    """No warm-up: the whole network at the peak LR from the first iteration, then decay (warm-up ablation)."""

    recipe = replace(DEFAULT_RECIPE, decoder_warmup_fraction=0.0, full_warmup_fraction=0.0)
    primus_recipe = None


class nnsslFinetuneTrainer_warmup10(nnsslFinetuneTrainer):
    """Warm-ups twice the default's: 10 % decoder-only (encoder frozen) + 10 % whole network (warm-up ablation)."""

    recipe = replace(DEFAULT_RECIPE, decoder_warmup_fraction=0.1, full_warmup_fraction=0.1)
    primus_recipe = None


class nnsslFinetuneTrainer_encdec(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, transfer_parts=("stem", "encoder", "decoder"), decoder_warmup_fraction=0.0)
    primus_recipe = None


class nnsslFinetuneTrainer_frozen(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, freeze_encoder_throughout=True)
    primus_recipe = None


class nnsslFinetuneTrainer_150ep(nnsslFinetuneTrainer):
    """The paper's shortened schedule (Table 8): 150 epochs, 50 + 50 of them warm-ups, 50 of decay."""

    recipe = replace(PAPER_RECIPE, num_epochs=150, decoder_warmup_fraction=1 / 3, full_warmup_fraction=1 / 3)
    primus_recipe = None


class nnsslFinetuneTrainer_amaes(nnsslFinetuneTrainer):
    """AMAES fine-tuning: AdamW 1e-4 (amsgrad), cosine decay, no warm-up, spatial-only augmentation."""

    recipe = replace(DEFAULT_RECIPE, peak_lr=1e-4, optimizer="adamw", decay="cosine", deep_supervision=False,
                     decoder_warmup_fraction=0.0, full_warmup_fraction=0.0, spatial_only_augmentation=True)
    primus_recipe = None


class nnsslFinetuneTrainer_scratch(nnsslFinetuneTrainer):
    """The default recipe from random initialisation (an ablation of the pretrained weights, not a baseline); on
    Primus plans nnU-Net's Primus schedule from scratch (AdamW 3e-4, as ``nnUNet_Primus_M_Trainer``)."""

    recipe = DEFAULT_RECIPE.from_scratch()
    primus_recipe = PRIMUS_RECIPE.from_scratch()


class nnsslFinetuneTrainer_paper_scratch(nnsslFinetuneTrainer):
    """The paper recipe from random initialisation (the same-recipe twin of ``_paper``)."""

    recipe = PAPER_RECIPE.from_scratch()
    primus_recipe = None


for _trainer in (nnsslFinetuneTrainer, nnsslFinetuneTrainer_scratch):
    define_epoch_variants(_trainer, globals())
