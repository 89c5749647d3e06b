"""Warm-up fine-tuning trainers for a downstream dataset planned with ``nnssl_prepare_finetune``.

``nnUNetv2_train ID 3d_fullres FOLD -tr nnsslFinetuneTrainer -p nnsslFinetunePlans``. The pretrained checkpoint is
the one recorded in the plans (``nnssl_pretrained.checkpoint``) or, overriding it, the ``nnssl_pretrained_checkpoint``
environment variable. Stem and encoder are transferred by the adaptation plan's prefixes, the decoder starts fresh.
Each trainer is one ``FinetuneRecipe`` (``nnssl/finetuning/recipe.py``); the README's fine-tuning table lists them and
the measurements that chose the default.
"""

import os
from dataclasses import replace
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl import citations
from nnssl.integration.checkpoint import unwrap
from nnssl.finetuning.augmentation import spatial_only_training_transforms
from nnssl.finetuning.recipe import DEFAULT_RECIPE, PAPER_RECIPE, FinetuneRecipe
from nnssl.finetuning.schedule import FinetuneSchedule
from nnssl.finetuning.transfer import PretrainedWeightsError, load_pretrained_checkpoint, transfer_pretrained_weights
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

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.recipe.peak_lr  # what nnU-Net's own code (logging, plots) reads
        self.num_epochs = self.recipe.num_epochs
        self.enable_deep_supervision = self.recipe.deep_supervision
        self.schedule: Optional[FinetuneSchedule] = None
        self._iteration_in_epoch = 0
        self.restored_from_checkpoint = False

    @property
    def global_step(self) -> int:
        return self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        self.schedule = FinetuneSchedule(self.recipe, self.num_epochs * self.num_iterations_per_epoch)
        network = unwrap(self.network)
        if not self.recipe.deep_supervision:
            freeze_unused_deep_supervision_heads(network)
        encoder_ids = {id(p) for p in network.encoder.parameters()}
        # decoder group first: nnU-Net logs and plots param_groups[0]'s LR, i.e. the schedule's LR
        groups = [
            {"params": [p for p in network.parameters() if id(p) not in encoder_ids], "nnssl_part": "decoder"},
            {"params": [p for p in network.parameters() if id(p) in encoder_ids], "nnssl_part": "encoder"},
        ]
        if self.recipe.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=self.recipe.peak_lr, weight_decay=self.weight_decay,
                                          amsgrad=True, eps=1e-8)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.recipe.peak_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
        self.print_to_log_file(f"Fine-tuning ({self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations): {self.schedule.describe()}")
        return optimizer, FinetuneLRController(optimizer, self.schedule, self.num_iterations_per_epoch)

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

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
        self._iteration_in_epoch += 1
        return super().train_step(batch)

    def get_training_transforms(self, *args, **kwargs):
        if self.recipe.spatial_only_augmentation:
            return spatial_only_training_transforms(*args, **kwargs)
        return nnUNetTrainer.get_training_transforms(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ weights
    def pretrained_checkpoint_path(self) -> Optional[str]:
        recorded = self.plans_manager.plans.get("nnssl_pretrained", {}).get("checkpoint")
        return os.environ.get(CHECKPOINT_VARIABLE) or recorded

    def on_train_start(self):
        """The pretrained weights are read once, at the start of a fresh training: a run resumed with ``--c`` (or
        validated with ``--val``) restores its own checkpoint and never needs the pretrained file again."""
        if not self.was_initialized:
            self.initialize()
        if self.recipe.loads_pretrained and not self.restored_from_checkpoint:
            self._load_pretrained_weights()
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self.restored_from_checkpoint = True

    def _load_pretrained_weights(self) -> None:
        path = self.pretrained_checkpoint_path()
        if not path:
            raise PretrainedWeightsError(
                f"{self.__class__.__name__} needs a pretrained checkpoint: plan the dataset with "
                f"'nnssl_prepare_finetune -d ID -c CHECKPOINT' (recorded in the plans) or set {CHECKPOINT_VARIABLE}."
                f" For training from scratch with the same recipe use nnsslFinetuneTrainer_scratch.")
        checkpoint = load_pretrained_checkpoint(path)
        plan = checkpoint.get("nnssl_adaptation_plan") or self.plans_manager.plans.get("nnssl_pretrained") or {}
        report = transfer_pretrained_weights(unwrap(self.network), checkpoint["network_weights"], plan,
                                             self.recipe.transfer_parts, source=os.path.basename(path))
        self.print_to_log_file(f"Pretrained weights from {path} ({checkpoint.get('trainer_name', 'unknown trainer')}):")
        for line in report.lines():
            self.print_to_log_file("  " + line)
        references = [*(checkpoint.get("citations") or []),
                      *citations.checkpoint_entries([citations.S3D, citations.NNUNET])]
        self.print_to_log_file("Please cite:\n  " + "\n  ".join(citations.apa_lines(references)))


class nnsslFinetuneTrainer_paper(nnsslFinetuneTrainer):
    """The S3D paper's best full-length recipe: peak LR 1e-3, deep supervision off, 5 % + 5 % warm-ups."""

    recipe = PAPER_RECIPE


class nnsslFinetuneTrainer_lr1e3(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, peak_lr=1e-3)


class nnsslFinetuneTrainer_noDS(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, deep_supervision=False)


class nnsslFinetuneTrainer_singlewarmup(nnsslFinetuneTrainer):
    """One whole-network warm-up, then decay (nnU-Net's nnssl ``PretrainedTrainer`` shape)."""

    recipe = replace(DEFAULT_RECIPE, decoder_warmup_fraction=0.0)


class nnsslFinetuneTrainer_encdec(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, transfer_parts=("stem", "encoder", "decoder"), decoder_warmup_fraction=0.0)


class nnsslFinetuneTrainer_frozen(nnsslFinetuneTrainer):
    recipe = replace(DEFAULT_RECIPE, freeze_encoder_throughout=True)


class nnsslFinetuneTrainer_150ep(nnsslFinetuneTrainer):
    """The paper's shortened schedule (Table 8): 150 epochs, 50 + 50 of them warm-ups, 50 of decay."""

    recipe = replace(PAPER_RECIPE, num_epochs=150, decoder_warmup_fraction=1 / 3, full_warmup_fraction=1 / 3)


class nnsslFinetuneTrainer_amaes(nnsslFinetuneTrainer):
    """AMAES fine-tuning: AdamW 1e-4 (amsgrad), cosine decay, no warm-up, spatial-only augmentation."""

    recipe = replace(DEFAULT_RECIPE, peak_lr=1e-4, optimizer="adamw", decay="cosine", deep_supervision=False,
                     decoder_warmup_fraction=0.0, full_warmup_fraction=0.0, spatial_only_augmentation=True)


class nnsslFinetuneTrainer_scratch(nnsslFinetuneTrainer):
    """The default recipe from random initialisation (an ablation of the pretrained weights, not a baseline)."""

    recipe = DEFAULT_RECIPE.from_scratch()


class nnsslFinetuneTrainer_paper_scratch(nnsslFinetuneTrainer):
    """The paper recipe from random initialisation (the same-recipe twin of ``_paper``)."""

    recipe = PAPER_RECIPE.from_scratch()


for _trainer in (nnsslFinetuneTrainer, nnsslFinetuneTrainer_scratch):
    define_epoch_variants(_trainer, globals())
