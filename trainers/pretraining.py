"""``nnsslPretrainTrainer``: the nnU-Net trainer lifecycle adapted to self-supervised pretraining.

Subclasses only say how to build the pretraining model around the plans' network (``wrap_network``), how to compute
the loss of a batch (``compute_loss``) and which weights are transferable
(``transferable_state_dict``). This base class provides what every method shares:

* the pretraining recipe (``nnssl/methods/recipe.py``: SGD 1e-2, Nesterov 0.99, wd 3e-5, poly decay, clipping at 12,
  1000 x 250 iterations; or AdamW with a linear warm-up, as the Primus recipe);
* bf16 autocast on CUDA (a recipe with ``precision="fp16"`` uses fp16 with a GradScaler), fp32 on CPU;
* validation = the pretraining loss on held-out patches; ``checkpoint_best.pth`` = lowest validation loss; no
  segmentation validation after training;
* a bounded number of non-finite losses per epoch, then a clear error;
* per-image or subject-balanced case sampling (``nnssl_sampling``, ``nnssl.integration.subject_sampling``);
* checkpoints that nnU-Net can resume (``--c``) and that downstream code can consume: ``network_weights`` holds the
  plain dna state dict, ``nnssl_adaptation_plan`` and ``citations`` are added, the full pretraining model (tokens,
  heads) is kept under ``nnssl_pretraining_weights`` for resuming.
"""

from contextlib import nullcontext
from functools import partial
from os.path import join
from time import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnssl import citations
from nnssl.architectures import network_from_configuration
from nnssl.augmentation import PRETRAINING_ROTATION, PRETRAINING_SCALING, spatial_transforms
from nnssl.citations import Citation
from nnssl.device_augmentation import DeviceSpatialAugmentation, SpatialAugmentationConfig
from nnssl.finetuning.adaptation_plan import build_adaptation_plan
from nnssl.integration.checkpoint import (PretrainingCheckpoint, checkpoint_dict, checkpoint_from_dict,
                                          save_checkpoint_generation, unwrap)
from nnssl.integration.distributed import gather_from_all_ranks
from nnssl.integration.pretraining_loader import PretrainingDataLoader
from nnssl.integration.run_state import RUN_STATE_KEY
from nnssl.integration.seeding import DEVICE_AUGMENTATION_STREAM, seeded_stream
from nnssl.integration.subject_sampling import CaseSubjects, sampling_mode
from nnssl.lr_schedule import EpochLRScheduler
from nnssl.methods.recipe import PRETRAIN_RECIPE, PretrainRecipe
from nnssl.optimizer import recipe_optimizer
from nnssl.methods.progress_figure import save_progress_png
from nnssl.methods.reconstruction_figure import save_reconstruction_png
from nnssl.probe.periodic import CHECKPOINT_KEY as PROBE_KEY, PeriodicProbe, PeriodicProbeConfig, ProbeRecord
from nnssl.trainers.base import nnsslTrainerMixin


def freeze_unused_deep_supervision_heads(network: nn.Module) -> None:
    """dna builds a 1x1 output head per decoder stage; without deep supervision only the last one is used.

    The others would never get a gradient, which nnU-Net's DDP wrapper (``find_unused_parameters=False``) rejects.
    Freezing keeps their keys in the state dict, so checkpoints still load into a plain dna network.
    """
    decoder = getattr(network, "decoder", None)
    for head in list(getattr(decoder, "seg_layers", []))[:-1]:
        head.requires_grad_(False)


class NonFiniteLossError(RuntimeError):
    """Raised when an epoch produced more non-finite losses than the trainer tolerates."""


class nnsslPretrainTrainer(nnsslTrainerMixin, nnUNetTrainer):
    citations: Tuple[Citation, ...] = citations.PRETRAINING_BASE
    recipe: PretrainRecipe = PRETRAIN_RECIPE
    skips_unreadable_cases = True  # one unreadable volume among thousands must not end the run

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.recipe.peak_lr  # nnU-Net's optimizer and poly schedule read these attributes
        self.weight_decay = self.recipe.weight_decay
        self.num_epochs = self.recipe.num_epochs
        self.num_iterations_per_epoch = self.recipe.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.recipe.val_iterations_per_epoch
        self.save_every = self.recipe.save_every
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0  # uniform random crops: there is no foreground to oversample
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.recipe.uses_fp16 and self.device.type == "cuda" \
            else None
        self.best_val_loss: Optional[float] = None
        self._nonfinite_losses_this_epoch = 0
        self.case_sampling = sampling_mode()  # a bad value stops the run here, before any work
        self.case_subjects: Optional[CaseSubjects] = None  # set by get_dataloaders under nnssl_sampling=subject
        probe_config = PeriodicProbeConfig.from_environment()  # off unless nnssl_probe_dataset is set
        self.periodic_probe = PeriodicProbe(probe_config, self.plans_manager.plans_name) if probe_config else None
        self.probe_record: Optional[ProbeRecord] = None
        self.check_plans()

    # ----------------------------------------------------------------------------------------- what subclasses provide
    def check_plans(self) -> None:
        """Refuse plans whose network this method cannot pretrain (the end of ``__init__``, before any work)."""

    def wrap_network(self, network: nn.Module) -> nn.Module:
        """Build the pretraining model around the plans' dna network."""
        raise NotImplementedError

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        raise NotImplementedError

    def transferable_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """What the (unwrapped) pretraining model exports as ``network_weights``: plain dna keys only.

        Methods whose decoder or heads are not meant for transfer (VoCo, AMAES) export ``encoder.*`` only.
        """
        return model.network.state_dict()

    def reconstruction_panels(self, batch: dict) -> Optional[Dict[str, np.ndarray]]:
        """Arrays for the periodic reconstruction PNG (None: the method has nothing to show)."""
        return None

    def extra_state(self) -> dict:
        """Trainer state beyond nnU-Net's that a resumed run needs (e.g. random streams). Called on every rank when
        a checkpoint is saved, so it may gather from all ranks."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------------------------------------ network & data
    def build_network_architecture(self, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = False) -> nn.Module:
        network = network_from_configuration(configuration_manager, num_input_channels,
                                             self.num_output_channels(num_input_channels), deep_supervision=False)
        freeze_unused_deep_supervision_heads(network)
        return self.wrap_network(network)

    def configure_optimizers(self):
        """nnU-Net's SGD + poly for the SGD recipe without warm-up (as before recipes had a choice); otherwise the
        recipe's optimizer with a per-epoch linear warm-up then decay (all parameters, one LR)."""
        recipe = self.recipe
        if recipe.optimizer == "sgd" and recipe.warmup_fraction == 0 and recipe.decay == "poly":
            return super().configure_optimizers()
        optimizer = recipe_optimizer(self.network.parameters(), recipe.optimizer, recipe.peak_lr, recipe.weight_decay,
                                     betas=recipe.adamw_betas)
        scheduler = EpochLRScheduler(optimizer, recipe.peak_lr, recipe.warmup_fraction, recipe.decay,
                                     self.num_epochs)
        self.print_to_log_file(f"Optimizer {recipe.optimizer} (weight decay {recipe.weight_decay}, gradient clipping "
                               f"at {recipe.gradient_clip_norm}): {scheduler.describe()}")
        return optimizer, scheduler

    def num_output_channels(self, num_input_channels: int) -> int:
        """Reconstruction methods predict every input channel."""
        return num_input_channels

    def _do_i_compile(self) -> bool:
        # opt-in only (nnUNet_compile=1): nnU-Net compiles by default on CUDA, untested for the pretraining models
        import os

        return self.device.type == "cuda" and os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        patch_size = self.configuration_manager.patch_size
        mirror_axes = (0, 1, 2)
        initial_patch_size = get_patch_size(patch_size, PRETRAINING_ROTATION, PRETRAINING_ROTATION,
                                            PRETRAINING_ROTATION, PRETRAINING_SCALING)
        self.inference_allowed_mirroring_axes = mirror_axes
        return PRETRAINING_ROTATION, False, initial_patch_size, mirror_axes

    # True: the workers only crop; the method's compute_loss passes training batches through device_training_batch,
    # which rotates/scales/mirrors them on self.device (nnssl.device_augmentation). False: batchgeneratorsv2 in the
    # augmentation workers
    spatial_augmentation_on_device: bool = False

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """None with device augmentation: the workers only read and crop the pre-rotation patch."""
        if cls.spatial_augmentation_on_device:
            return None
        return spatial_transforms(patch_size, rotation_for_DA, mirror_axes)

    @property
    def needs_region_map(self) -> bool:
        """Whether the loss reads the batch's region map (nnU-Net's "target"); if not, the loader skips it."""
        return False

    def build_device_augmentation(self) -> DeviceSpatialAugmentation:
        """The spatial augmentation of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, on the device;
        under ``nnssl_seed`` its generator gets a stream of its own per rank."""
        rotation, _, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return DeviceSpatialAugmentation(
            self.configuration_manager.patch_size,
            SpatialAugmentationConfig(rotation=tuple(rotation), mirror_axes=tuple(mirror_axes or ())),
            seed=seeded_stream(self.nnssl_rank, DEVICE_AUGMENTATION_STREAM))

    def data_loader_class(self):
        """What ``get_dataloaders`` builds in place of ``nnUNetDataLoader`` (same arguments)."""
        return partial(PretrainingDataLoader, read_region_map=self.needs_region_map,
                       shared_batches=get_allowed_n_proc_DA() > 0, case_subjects=self.case_subjects)

    def get_dataloaders(self):
        if self.spatial_augmentation_on_device:
            self.device_augmentation = self.build_device_augmentation()
        if self.case_sampling == "subject":  # every rank reads the same file: the same probabilities everywhere
            self.case_subjects = CaseSubjects.of_raw_dataset(nnUNet_raw, self.plans_manager.dataset_name)
        return super().get_dataloaders()

    def get_tr_and_val_datasets(self):
        datasets = super().get_tr_and_val_datasets()
        if self.case_subjects is not None:
            self.print_to_log_file(self.case_subjects.summary(datasets[0].identifiers))
        return datasets

    def random_generators(self) -> Dict[str, torch.Generator]:
        if not self.spatial_augmentation_on_device:
            return {}
        return {"device_augmentation": self.device_augmentation.generator}

    def device_training_batch(self, batch: dict) -> dict:
        """The training batch on ``self.device``, spatially augmented there when ``spatial_augmentation_on_device``."""
        if not self.spatial_augmentation_on_device:
            return batch
        data = batch["data"].to(self.device, non_blocking=True)
        region = batch["target"]
        region = None if region is None else region.to(self.device, non_blocking=True)
        data, region = self.device_augmentation(data, region)
        return {**batch, "data": data, "target": region}

    def set_deep_supervision_enabled(self, enabled: bool):
        """Pretraining never uses deep supervision (the network is built without it)."""

    def _build_loss(self):
        return None  # the loss lives in compute_loss

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file("Please cite:\n  " + "\n  ".join(c.apa for c in self.citations),
                               also_print_to_console=False)
        self._prepare_periodic_probe()

    # ------------------------------------------------------------------------------------------------- steps
    def autocast(self):
        if self.device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.recipe.uses_fp16 else torch.bfloat16)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.compute_loss(batch, train=True)
        # backward always runs (under DDP every rank must take part); a non-finite gradient skips the update
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            if torch.isfinite(self._clip_gradients()):
                self.optimizer.step()
        value = float(loss.detach().float().cpu())
        if not np.isfinite(value):
            self._count_nonfinite_loss()
        return {"loss": value}

    def _clip_gradients(self) -> torch.Tensor:
        parameters = [p for p in self.network.parameters() if p.grad is not None]
        max_norm = self.recipe.gradient_clip_norm if self.recipe.gradient_clip_norm is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def _count_nonfinite_loss(self) -> None:
        self._nonfinite_losses_this_epoch += 1
        if self._nonfinite_losses_this_epoch > self.recipe.max_nonfinite_losses_per_epoch:
            message = (f"{self.__class__.__name__}: {self._nonfinite_losses_this_epoch} non-finite (NaN/inf) losses "
                       f"in epoch {self.current_epoch} (limit {self.recipe.max_nonfinite_losses_per_epoch}); training "
                       f"stopped. Resume from the last good checkpoint with --c after checking the data for extreme "
                       f"values, or lower the learning rate (fp16 runs: use the default bf16 trainer instead).")
            self.print_to_log_file(message)
            raise NonFiniteLossError(message)

    def on_train_epoch_start(self):
        self._nonfinite_losses_this_epoch = 0
        super().on_train_epoch_start()

    def validation_step(self, batch: dict) -> dict:
        with self.autocast():
            loss = self.compute_loss(batch, train=False)
        return {"loss": float(loss.detach().float().cpu())}

    def _epoch_mean(self, outputs: List[dict]) -> float:
        losses = np.concatenate(gather_from_all_ranks(np.asarray(collate_outputs(outputs)["loss"], dtype=np.float64)))
        finite = losses[np.isfinite(losses)]
        return float(finite.mean()) if finite.size else float("nan")

    def on_train_epoch_end(self, train_outputs: List[dict]):
        self.logger.log("train_losses", self._epoch_mean(train_outputs), self.current_epoch)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        self.logger.log("val_losses", self._epoch_mean(val_outputs), self.current_epoch)
        # nnU-Net's logger and progress plot expect these keys; there is no segmentation to score
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [], self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        train_loss = self.logger.get_value("train_losses", step=-1)
        val_loss = self.logger.get_value("val_losses", step=-1)
        self.print_to_log_file("train_loss", np.round(train_loss, decimals=5))
        self.print_to_log_file("val_loss", np.round(val_loss, decimals=5))
        epoch_time = (self.logger.get_value("epoch_end_timestamps", step=-1)
                      - self.logger.get_value("epoch_start_timestamps", step=-1))
        self.print_to_log_file(f"Epoch time: {np.round(epoch_time, decimals=2)} s")
        self._run_periodic_probe(epoch_time)

        last_epoch = self.current_epoch == self.num_epochs - 1
        # the figure draws a batch and masks: before the checkpoints, which keep the streams the next epoch continues
        if self.current_epoch % self.recipe.reconstruction_png_every == 0 or last_epoch:
            self._save_reconstruction_png()
        if (self.current_epoch + 1) % self.save_every == 0 and not last_epoch:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if np.isfinite(val_loss) and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = float(val_loss)
            self.print_to_log_file(f"New best validation loss: {np.round(val_loss, decimals=5)}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            record = self.probe_record
            save_progress_png(self.logger.get_checkpoint(), self.output_folder,
                              record.dice if record else None, record.random_dice if record else None)
        self.current_epoch += 1

    # ------------------------------------------------------------------------------------------------- periodic probe
    def _prepare_periodic_probe(self) -> None:
        """Rank 0 plans and preprocesses the probe's labeled dataset (unless done before); a resumed run keeps its
        record when it probes the same dataset with the same settings."""
        if self.periodic_probe is None:
            return
        if self.nnssl_rank == 0:
            self.print_to_log_file(f"Periodic probe: {self.periodic_probe.config.describe()}")
            reference = {"network_weights": self.transferable_state_dict(unwrap(self.network)),
                         "nnssl_adaptation_plan": self.adaptation_plan(), "trainer_name": self.__class__.__name__,
                         "citations": citations.checkpoint_entries(self.citations)}
            record = self.periodic_probe.prepare(join(self.output_folder, "checkpoint_final.pth"), reference,
                                                 self.print_to_log_file, self.device, self.random_generators())
            restored = self.probe_record
            if restored is None or (restored.dataset, restored.plans, restored.settings) != \
                    (record.dataset, record.plans, record.settings):
                self.probe_record = record
            self.print_to_log_file(f"Probe on {record.dataset} ({record.plans}): {record.split}")
        self._wait_for_rank_0()

    def _run_periodic_probe(self, epoch_time: float) -> None:
        probe = self.periodic_probe
        if probe is None or not probe.config.due(self.current_epoch, self.num_epochs):
            return
        if self.nnssl_rank == 0:
            record = self.probe_record
            probe.run(record, self.current_epoch, self.transferable_state_dict(unwrap(self.network)),
                      self.adaptation_plan(), self.device, self.random_generators())
            dice, floor = record.dice[self.current_epoch], record.random_dice
            ratio = f"{dice / floor:.3f}" if floor else "n/a"
            self.print_to_log_file(f"probe Dice {dice:.4f} (random encoder {floor:.4f}, ratio {ratio}) on "
                                   f"{record.dataset}; the probe took {record.seconds[self.current_epoch]:.1f} s, "
                                   f"the epoch {epoch_time:.1f} s")
        self._wait_for_rank_0()

    def _wait_for_rank_0(self) -> None:
        """The other ranks wait here while rank 0 probes (the probe must stay shorter than the process group's
        timeout: its cost is logged)."""
        if self.is_ddp:
            dist.barrier()

    def _save_reconstruction_png(self) -> None:
        """Every rank draws the figure's batch and masks (random streams shared by the ranks, such as the mask
        ratio, stay in step; no rank runs the DDP model alone); rank 0 writes the PNG."""
        self.network.eval()
        with torch.no_grad(), self.autocast():
            panels = self.reconstruction_panels(self.next_batch("val"))
        if panels is not None and self.local_rank == 0:
            filename = join(self.output_folder, f"reconstruction_epoch_{self.current_epoch:04d}.png")
            save_reconstruction_png(panels, filename, f"{self.__class__.__name__}, epoch {self.current_epoch}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining trainer: no segmentation validation (validation loss is logged per "
                               "epoch; checkpoint_best.pth has the lowest one).")

    # ------------------------------------------------------------------------------------------------- checkpoints
    def adaptation_plan(self) -> dict:
        return build_adaptation_plan(self.plans_manager.plans, self.configuration_name, self.num_input_channels,
                                     self.configuration_manager.patch_size)

    def save_checkpoint(self, filename: str) -> None:
        extra_state = self.extra_state()  # on every rank: it may gather per-rank state
        run_state = self.run_state()  # collective too
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        model = unwrap(self.network)
        checkpoint = PretrainingCheckpoint(
            network_weights=self.transferable_state_dict(model), pretraining_weights=model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            grad_scaler_state=self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            logging=self.logger.get_checkpoint(), best_ema=self._best_ema,
            next_epoch=run_state["position"]["epoch"], init_args=self.my_init_kwargs,
            trainer_name=self.__class__.__name__, inference_allowed_mirroring_axes=self.inference_allowed_mirroring_axes,
            best_val_loss=self.best_val_loss, trainer_state=extra_state, adaptation_plan=self.adaptation_plan(),
            citations=citations.checkpoint_entries(self.citations))
        probe = {PROBE_KEY: self.probe_record.to_dict()} if self.probe_record is not None else {}
        save_checkpoint_generation({**checkpoint_dict(checkpoint), RUN_STATE_KEY: run_state, **probe}, filename)

    def restore_checkpoint(self, checkpoint: dict, source: str) -> None:
        restored = checkpoint_from_dict(checkpoint, source)
        unwrap(self.network).load_state_dict(restored.pretraining_weights)
        self.my_init_kwargs = restored.init_args
        self.current_epoch = restored.next_epoch
        self.logger.load_checkpoint(restored.logging)
        self._best_ema = restored.best_ema
        self.best_val_loss = restored.best_val_loss
        self.optimizer.load_state_dict(restored.optimizer_state)
        if self.grad_scaler is not None and restored.grad_scaler_state is not None:
            self.grad_scaler.load_state_dict(restored.grad_scaler_state)
        self.load_extra_state(restored.trainer_state)
        probe = checkpoint.get(PROBE_KEY)
        self.probe_record = ProbeRecord.from_dict(probe) if probe else None
