"""Warm-up fine-tuning trainers for a downstream dataset planned with ``nnssl_prepare_finetune``.

``nnUNetv2_train ID 3d_fullres FOLD -tr nnsslFinetuneTrainer -p nnsslFinetunePlans``. The pretrained checkpoint is
the one recorded in the plans (``nnssl_pretrained.checkpoint``) or, overriding it, the ``nnssl_pretrained_checkpoint``
environment variable. Stem and encoder are transferred by the adaptation plan's prefixes, the decoder starts fresh.
Deep supervision is off, as in nnssl's downstream reference (the PretrainedTrainer of nnU-Net's nnssl integration),
so pretrained and scratch runs share one recipe.

| trainer | transfer | schedule (1000 epochs unless stated) |
| --- | --- | --- |
| nnsslFinetuneTrainer | stem+encoder | 50 ep decoder warm-up (encoder frozen), 50 ep full warm-up, poly; peak 1e-3 |
| _singlewarmup | stem+encoder | 50 ep whole-network warm-up, poly (nnU-Net dev-branch PretrainedTrainer) |
| _encdec | stem+encoder+decoder | 50 ep whole-network warm-up, poly |
| _frozen | stem+encoder | decoder warm-up then decoder-only training; encoder frozen throughout |
| _lr1e2 | stem+encoder | default schedule with peak LR 1e-2 |
| _150ep | stem+encoder | 150 epochs: the same 50 + 50 warm-ups, then 50 epochs of poly (paper Table 8) |
| _amaes | stem+encoder | AdamW 1e-4 (amsgrad, wd 3e-5), cosine decay, no warm-up, spatial-only augmentation |
| nnsslFinetuneTrainer_scratch | nothing | identical plan and LR schedule, random init (the fair baseline) |
"""

import os
from typing import Optional, Tuple

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl import citations
from nnssl.finetune_augmentation import spatial_only_training_transforms
from nnssl.checkpoint import unwrap
from nnssl.finetune_schedule import FinetuneSchedule
from nnssl.transfer import PretrainedWeightsError, load_pretrained_checkpoint, transfer_pretrained_weights
from nnssl.trainers.base import nnsslTrainerMixin
from nnssl.trainers.variants import define_epoch_variants

CHECKPOINT_VARIABLE = "nnssl_pretrained_checkpoint"


class FinetuneLRController:
    """Stands in for nnU-Net's per-epoch LR scheduler and sets both parameter groups' LR every iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: FinetuneSchedule):
        self.optimizer = optimizer
        self.schedule = schedule

    def set(self, epoch: int, iteration: int) -> None:
        for group in self.optimizer.param_groups:
            lr_of = self.schedule.encoder_lr if group["nnssl_part"] == "encoder" else self.schedule.lr
            group["lr"] = lr_of(epoch, iteration)

    def step(self, epoch: int) -> None:  # nnU-Net calls this at every epoch start
        self.set(epoch, 0)


class nnsslFinetuneTrainer(nnsslTrainerMixin, nnUNetTrainer):
    peak_lr: float = 1e-3
    decoder_warmup_epochs: int = 50
    full_warmup_epochs: int = 50
    decay: str = "poly"
    freeze_encoder_throughout: bool = False
    freeze_encoder_in_decoder_warmup: bool = True
    transfer_parts: Tuple[str, ...] = ("stem", "encoder")
    load_pretrained: bool = True
    optimizer_name: str = "sgd"

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.peak_lr
        self.enable_deep_supervision = False
        self.save_every = 10  # stage boundaries (50, 100) fall on saves: a kill loses at most 10 epochs
        self.schedule: Optional[FinetuneSchedule] = None
        self._iteration_in_epoch = 0

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        self.schedule = FinetuneSchedule.fitted_to(
            self.num_epochs, peak_lr=self.peak_lr, iterations_per_epoch=self.num_iterations_per_epoch,
            decoder_warmup_epochs=self.decoder_warmup_epochs, full_warmup_epochs=self.full_warmup_epochs,
            decay=self.decay, freeze_encoder_throughout=self.freeze_encoder_throughout,
            freeze_encoder_in_decoder_warmup=self.freeze_encoder_in_decoder_warmup)
        network = unwrap(self.network)
        encoder_ids = {id(p) for p in network.encoder.parameters()}
        # decoder group first: nnU-Net logs and plots param_groups[0]'s LR, i.e. the schedule's LR
        groups = [
            {"params": [p for p in network.parameters() if id(p) not in encoder_ids], "nnssl_part": "decoder"},
            {"params": [p for p in network.parameters() if id(p) in encoder_ids], "nnssl_part": "encoder"},
        ]
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, weight_decay=self.weight_decay, amsgrad=True,
                                          eps=1e-8)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.peak_lr, weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
        self.print_to_log_file(
            f"Fine-tuning schedule: {self.schedule.decoder_warmup_epochs} epochs decoder warm-up (encoder frozen), "
            f"{self.schedule.full_warmup_epochs} epochs full warm-up, {self.schedule.decay} decay to epoch "
            f"{self.num_epochs}, peak LR {self.peak_lr}, optimizer {self.optimizer_name}"
            + (", encoder frozen throughout" if self.freeze_encoder_throughout else ""))
        return optimizer, FinetuneLRController(optimizer, self.schedule)

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        if self.current_epoch == self.schedule.decoder_warmup_epochs and self.current_epoch > 0 \
                and self.freeze_encoder_in_decoder_warmup and not self.freeze_encoder_throughout:
            self._reset_encoder_optimizer_state()
        super().on_train_epoch_start()

    def _reset_encoder_optimizer_state(self) -> None:
        """Momentum gathered while the encoder was frozen (LR 0) must not hit it when it starts to learn."""
        for group in self.optimizer.param_groups:
            if group["nnssl_part"] == "encoder":
                for parameter in group["params"]:
                    self.optimizer.state.pop(parameter, None)
        self.print_to_log_file("Encoder unfrozen: full-network warm-up starts")

    def train_step(self, batch: dict) -> dict:
        self.lr_scheduler.set(self.current_epoch, self._iteration_in_epoch)
        self._iteration_in_epoch += 1
        return super().train_step(batch)

    # ------------------------------------------------------------------------------------------------ weights
    def pretrained_checkpoint_path(self) -> Optional[str]:
        recorded = self.plans_manager.plans.get("nnssl_pretrained", {}).get("checkpoint")
        return os.environ.get(CHECKPOINT_VARIABLE) or recorded

    def initialize(self):
        was_initialized = self.was_initialized
        super().initialize()
        if not was_initialized and self.load_pretrained:
            self._load_pretrained_weights()

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
                                             self.transfer_parts, source=os.path.basename(path))
        self.print_to_log_file(f"Pretrained weights from {path} ({checkpoint.get('trainer_name', 'unknown trainer')}):")
        for line in report.lines():
            self.print_to_log_file("  " + line)
        references = list(checkpoint.get("citations") or []) + [citations.S3D, citations.NNUNET]
        self.print_to_log_file("Please cite:\n  " + "\n  ".join(dict.fromkeys(references)))


class nnsslFinetuneTrainer_singlewarmup(nnsslFinetuneTrainer):
    decoder_warmup_epochs = 0


class nnsslFinetuneTrainer_encdec(nnsslFinetuneTrainer):
    transfer_parts = ("stem", "encoder", "decoder")
    decoder_warmup_epochs = 0


class nnsslFinetuneTrainer_frozen(nnsslFinetuneTrainer):
    freeze_encoder_throughout = True


class nnsslFinetuneTrainer_lr1e2(nnsslFinetuneTrainer):
    peak_lr = 1e-2


class nnsslFinetuneTrainer_150ep(nnsslFinetuneTrainer):
    fixed_num_epochs = 150


class nnsslFinetuneTrainer_amaes(nnsslFinetuneTrainer):
    peak_lr = 1e-4
    optimizer_name = "adamw"
    decay = "cosine"
    decoder_warmup_epochs = 0
    full_warmup_epochs = 0
    get_training_transforms = staticmethod(spatial_only_training_transforms)


class nnsslFinetuneTrainer_scratch(nnsslFinetuneTrainer):
    """Same plan and LR curve, random initialisation; nothing is frozen (there is nothing pretrained to protect)."""

    load_pretrained = False
    freeze_encoder_in_decoder_warmup = False


for _trainer in (nnsslFinetuneTrainer, nnsslFinetuneTrainer_scratch):
    define_epoch_variants(_trainer, globals())
