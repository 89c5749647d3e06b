"""Training that survives a cluster: nnU-Net's training loop made resumable at any iteration.

Layered onto ``nnUNetTrainer`` (below ``nnsslTrainerMixin``), for every nnssl trainer:

* **automatic resume** (``nnssl.integration.auto_resume``): a torchrun restart, a SLURM requeue, a run stopped at a
  preemption request or ``nnssl_auto_resume=1`` continues from the run's own checkpoint, as ``--c`` would;
* **graceful preemption** (``nnssl.integration.preemption``): after a preemption signal every rank finishes its
  iteration, the ranks agree on the step, rank 0 writes ``checkpoint_latest.pth`` and the processes exit with
  ``PREEMPTED_EXIT_CODE``;
* **the same run after a resume** (``nnssl.integration.run_state``): checkpoints keep the position inside the epoch,
  the batches each loader delivered (seeded loaders draw batch ``i`` from streams of their own), every rank's random
  streams and the unfinished epoch's losses;
* **two generations** of ``checkpoint_latest.pth``: a resume that cannot read the newest falls back to the previous;
* **unreadable cases** (``nnssl.integration.unreadable_cases``): pretraining skips them up to a limit; segmentation
  training stops at the first, naming its file.

The loop is nnU-Net 2.8.1's ``run_training`` with these additions; every hook it calls is nnU-Net's.
"""

import os
import sys
from os.path import isfile, join
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnssl.errors import UserError
from nnssl.integration.auto_resume import (AUTO_RESUME_VARIABLE, auto_resume_setting, check_same_run,
                                           restart_reason, resume_candidate, run_identity)
from nnssl.integration.checkpoint import (LATEST, PREVIOUS, read_checkpoint_or_previous, save_checkpoint_generation,
                                          unwrap)
from nnssl.integration.distributed import gather_from_all_ranks
from nnssl.integration.patching import replaced_attribute
from nnssl.integration.preemption import (PREEMPTED_EXIT_CODE, Preempted, PreemptionRequest, agreed_flags,
                                          preemption_signals)
from nnssl.integration.run_state import (RUN_STATE_KEY, Position, RankState, RunState, capture_random_streams,
                                         from_plain, restore_random_streams, run_state_of, to_plain)
from nnssl.integration.seeding import seed_from_environment, seeded_augmenters
from nnssl.integration.unreadable_cases import (BATCH_KEY, UnreadableCaseError, UnreadableCases, unreadable_case_limit,
                                                unreadable_report)
from nnssl.trainers.guards import nnsslInputGuards


class CaseNamingDataLoader(nnUNetDataLoader):
    """nnU-Net's loader; a batch with a case it cannot read comes back as a report naming the case's file, so that
    the trainer's error (not only a worker's traceback) says which file it is."""

    _batch_keys: Sequence[str] = ()

    def get_indices(self):
        self._batch_keys = list(super().get_indices())
        return self._batch_keys

    def generate_train_batch(self) -> dict:
        try:
            return super().generate_train_batch()
        except Exception as error:  # whatever blosc2 or pickle raise on a truncated file
            return {BATCH_KEY: [unreadable_report(self._data.source_folder, self._first_unreadable(), error)]}

    def _first_unreadable(self) -> str:
        """The first case of the failed batch that cannot be read in full (the batch's first case if all can)."""
        for key in self._batch_keys:
            try:
                data, seg, _, _ = self._data.load_case(key)
                data[...], seg[...]
            except Exception:
                return key
        return self._batch_keys[0] if self._batch_keys else "(unknown case)"


def finish_augmenters(trainer) -> None:
    """Stop the augmentation workers, as nnU-Net's ``on_train_end`` does."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if loader is not None and hasattr(loader, "_finish"):
            loader._finish()


class nnsslResumableTraining(nnsslInputGuards):
    """nnU-Net's training loop, resumable at any iteration, preemptible, with automatic resume (module docstring)."""

    # pretraining skips unreadable cases (up to a limit); segmentation training stops at the first
    skips_unreadable_cases = False

    # ----------------------------------------------------------------------------------------------- state
    def initialize(self):
        if not self.was_initialized:
            self.iteration_in_epoch = 0
            self.batches_drawn: Dict[str, int] = {"train": 0, "val": 0}
            self.unreadable_cases = UnreadableCases(limit=0, num_cases=0)
            self.nnssl_resumed_from: Optional[str] = None
            self._resume_decided = False
            self._preemption = PreemptionRequest()
            self._resumed: Optional[RunState] = None
            self._stop: Optional[tuple] = None  # (position, epoch outputs) while a preemption is saved
        super().initialize()

    @property
    def nnssl_rank(self) -> int:
        return dist.get_rank() if self.is_ddp else 0

    def random_generators(self) -> Dict[str, torch.Generator]:
        """The trainer's own ``torch.Generator`` s that a resumed run must continue (e.g. device augmentation)."""
        return {}

    # ----------------------------------------------------------------------------------------------- data
    def data_loader_class(self):
        """What ``get_dataloaders`` builds in place of ``nnUNetDataLoader`` (same arguments)."""
        return CaseNamingDataLoader

    def get_dataloaders(self):
        """nnU-Net's loaders built from ``data_loader_class``; under ``nnssl_seed`` seeded per batch index and
        continuing at the batches a resumed run had drawn (nnU-Net draws and drops one batch of each first)."""
        first = {kind: max(0, drawn - 1) for kind, drawn in self.batches_drawn.items()}
        with replaced_attribute(nnunet_trainer_module, "nnUNetDataLoader", self.data_loader_class()):
            seed = seed_from_environment()
            if seed is None:
                loaders = super().get_dataloaders()
            else:
                with seeded_augmenters(seed, self.nnssl_rank, (first["train"], first["val"])):
                    loaders = super().get_dataloaders()
        self.batches_drawn = {kind: index + 1 for kind, index in first.items()}
        return loaders

    def next_batch(self, kind: str, count: bool = True) -> dict:
        """The next batch of the ``kind`` loader ("train", "val"), its unreadable cases noted; ``count=False`` leaves
        it to the caller to count the batch once it is used (a batch fetched at a stop is drawn again on resume)."""
        batch = next(self.dataloader_train if kind == "train" else self.dataloader_val)
        reports = batch.pop(BATCH_KEY, None)
        if reports and not self.skips_unreadable_cases:
            raise UnreadableCaseError(f"Cannot read the preprocessed case {reports[0][1]}. Segmentation training uses "
                                      f"every labeled case: preprocess it again (nnUNetv2_preprocess) or remove it, "
                                      f"then resume with --c.")
        for line in self.unreadable_cases.note(reports or ()):
            self.print_to_log_file(line)
        if count:
            self.batches_drawn[kind] += 1
        return batch

    # ----------------------------------------------------------------------------------------------- the loop
    def run_training(self):
        self.resume_automatically()
        self.on_train_start()
        self._continue_resumed_streams()
        self._preemption.install(preemption_signals())
        try:
            while self.current_epoch < self.num_epochs:
                self._run_epoch()
        except Preempted as stop:
            # Out at once, handlers still installed: torchrun sends SIGTERM to the ranks still running once the first
            # has exited, and Python's shutdown (which resets the handlers) took seconds here, so a rank died of that
            # SIGTERM instead of exiting with 75. The checkpoint is written; the workers die with this process.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code)
        except BaseException:
            self._preemption.uninstall()
            finish_augmenters(self)  # workers stopped before the error is reported, not torn down at exit
            raise
        self._preemption.uninstall()
        self.on_train_end()

    def _run_epoch(self) -> None:
        self.on_epoch_start()
        self.on_train_epoch_start()
        first_iteration, train_outputs = self._resumed_epoch()
        for iteration in range(first_iteration, self.num_iterations_per_epoch):
            batch = self._fetch_training_batch()
            self._stop_if_requested(Position(self.current_epoch, iteration), train_outputs, batch is None)
            self.batches_drawn["train"] += 1
            self.iteration_in_epoch = iteration
            train_outputs.append(self.train_step(batch))
        self.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            self.on_validation_epoch_start()
            val_outputs = [self.validation_step(self.next_batch("val"))
                           for _ in range(self.num_val_iterations_per_epoch)]
            self.on_validation_epoch_end(val_outputs)
        self.on_epoch_end()

    def _fetch_training_batch(self) -> Optional[dict]:
        """The next training batch, uncounted; None when the augmentation workers are gone because the job is being
        stopped (the signal that asked for the stop reached them too)."""
        try:
            return self.next_batch("train", count=False)
        except RuntimeError as error:  # batchgenerators: "One or more background workers are no longer alive"
            if self._preemption.received is None or isinstance(error, UserError):
                raise
            return None

    def _stop_if_requested(self, position: Position, epoch_outputs: List[Any], batch_missing: bool) -> None:
        """The ranks' agreement, before every iteration: stop at a preemption request or a batch that could not be
        fetched for one (checkpoint, exit), or at too many unreadable cases (error) on any rank."""
        preempt, too_many = agreed_flags([self._preemption.received is not None or batch_missing,
                                          self.unreadable_cases.exceeded], self.device)
        if too_many:
            error = self.unreadable_cases.error()
            self.print_to_log_file(str(error))
            raise error
        if not preempt:
            return
        signal_name = self._preemption.received or "a preemption signal to another rank"
        self.print_to_log_file(f"{signal_name}: stopping before iteration {position.iteration} of epoch "
                               f"{position.epoch}; writing {LATEST}")
        self._stop = (position, epoch_outputs)
        self.save_checkpoint(join(self.output_folder, LATEST))
        self.print_to_log_file(f"Preempted: checkpoint written, exiting with code {PREEMPTED_EXIT_CODE}. Rerun the "
                               f"same command to continue this run from it.")
        raise Preempted()

    # ----------------------------------------------------------------------------------------------- checkpoints
    def run_state(self) -> dict:
        """This run's ``nnssl_run_state`` (collective: every rank contributes its streams and epoch outputs)."""
        if self._stop is not None:
            position, epoch_outputs = self._stop
        else:  # written at the end of an epoch (nnU-Net saves before it counts the epoch as done)
            position, epoch_outputs = Position(self.current_epoch + 1, 0), []
        rank_state = RankState(capture_random_streams(self.device, self.random_generators()), to_plain(epoch_outputs))
        gathered = gather_from_all_ranks((rank_state, self._preemption.received, self.unreadable_cases.cases))
        unreadable = {case: problem for _, _, cases in gathered for case, problem in cases.items()}
        signal_name = None
        if self._stop is not None:
            received = [name for _, name, _ in gathered if name]
            signal_name = received[0] if received else "a preemption request"
        return RunState(position, dict(self.batches_drawn), [rank for rank, _, _ in gathered], unreadable,
                        signal_name).to_dict()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (same keys) with the run state, written atomically, in two generations for
        ``checkpoint_latest.pth``."""
        run_state = self.run_state()
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {"network_weights": unwrap(self.network).state_dict(),
                      "optimizer_state": self.optimizer.state_dict(),
                      "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                      "logging": self.logger.get_checkpoint(), "_best_ema": self._best_ema,
                      "current_epoch": run_state["position"]["epoch"], "init_args": self.my_init_kwargs,
                      "trainer_name": self.__class__.__name__,
                      "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                      RUN_STATE_KEY: run_state}
        save_checkpoint_generation(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` (``--c``, ``--val``, automatic resume), reading an unreadable
        ``checkpoint_latest.pth``'s previous generation instead, then the run state."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            self._load_checkpoint_dict(*read_checkpoint_or_previous(filename_or_checkpoint, self.device,
                                                                    self.print_to_log_file))
        else:
            self._load_checkpoint_dict(filename_or_checkpoint, "the checkpoint")

    def _load_checkpoint_dict(self, checkpoint: dict, source: str) -> None:
        self.restore_checkpoint(checkpoint, source)
        self._restore_run_state(run_state_of(checkpoint))
        self.nnssl_resumed_from = source

    def restore_checkpoint(self, checkpoint: dict, source: str) -> None:
        """Weights, optimizer, logger and epoch from a checkpoint dict, by nnU-Net's own ``load_checkpoint`` (which in
        2.8.1 takes only a file name: the checkpoint already read stands in for ``torch.load``'s answer)."""
        with replaced_attribute(torch, "load", lambda *args, **kwargs: checkpoint):
            super().load_checkpoint(source)

    def _restore_run_state(self, state: Optional[RunState]) -> None:
        if state is None:
            return
        self.current_epoch = state.position.epoch
        self.batches_drawn = dict(state.batches_drawn)
        self.unreadable_cases.cases.update(state.unreadable_cases)
        self._resumed = state
        logged = self.logger.get_checkpoint()  # a stopped epoch starts again with its start hooks: drop what they
        for values in logged.values():         # logged (nothing to drop after a finished epoch)
            del values[state.position.epoch:]
        self.logger.load_checkpoint(logged)

    def _resumed_epoch(self):
        """(first iteration, training outputs so far) of the epoch starting: where a resumed run stopped."""
        state, self._resumed = self._resumed, None
        if state is None or state.position.epoch != self.current_epoch:
            return 0, []
        own = state.rank(self.nnssl_rank)
        return state.position.iteration, from_plain(own.epoch_outputs) if own is not None else []

    def _continue_resumed_streams(self) -> None:
        """Put back this rank's random streams, once the loaders (and whatever ``on_train_start`` drew) are built."""
        own = self._resumed.rank(self.nnssl_rank) if self._resumed is not None else None
        if own is not None:
            restore_random_streams(own.random_streams, self.device, self.random_generators())

    def on_train_start(self):
        super().on_train_start()
        num_cases = len(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        self.unreadable_cases.limit = unreadable_case_limit(num_cases) if self.skips_unreadable_cases else 0
        self.unreadable_cases.num_cases = num_cases

    def on_train_end(self):
        if self.unreadable_cases.cases:
            self.print_to_log_file(f"{len(self.unreadable_cases.cases)} unreadable case(s) skipped in this run: "
                                   f"{', '.join(sorted(self.unreadable_cases.cases))}")
        super().on_train_end()
        previous = join(self.output_folder, PREVIOUS)
        if self.local_rank == 0 and isfile(previous):
            os.remove(previous)

    # ----------------------------------------------------------------------------------------------- auto-resume
    def resume_automatically(self) -> None:
        """Continue from the run's own checkpoint when this start is a restart, a requeue, the rerun of a preempted
        run or asked for (``nnssl_auto_resume=1``); nothing when ``--c`` already restored one."""
        if not self.was_initialized:
            self.initialize()
        setting = auto_resume_setting()
        if self._resume_decided or self.nnssl_resumed_from is not None or setting is False:
            return
        self._resume_decided = True  # nnssl_train decides before its start line, run_training again
        candidate = self._agreed_candidate()
        reason = restart_reason() or (f"{AUTO_RESUME_VARIABLE}=1" if setting else None)
        if candidate is None:
            if reason:
                self.print_to_log_file(f"{reason}: no checkpoint of this run in {self.output_folder} yet, starting at "
                                       f"epoch 0")
            return
        if reason is None:
            signal_name = _preempted_by(candidate)
            if signal_name is None:
                return  # a plain start, as nnU-Net's: the run starts over
            reason = f"this run stopped at a preemption request ({signal_name})"
        checkpoint, source = read_checkpoint_or_previous(candidate, self.device, self.print_to_log_file)
        check_same_run(checkpoint, run_identity(self.__class__.__name__, self.my_init_kwargs), source)
        self.print_to_log_file(f"{reason}: resuming this run from {source}")
        self._load_checkpoint_dict(checkpoint, source)
        iteration = self._resumed.position.iteration if self._resumed is not None else 0
        self.print_to_log_file(f"Resumed at epoch {self.current_epoch}"
                               + (f", iteration {iteration}" if iteration else ""))

    def _agreed_candidate(self) -> Optional[str]:
        """Rank 0's resume candidate, for every rank (ranks must not disagree on whether to resume)."""
        candidate = resume_candidate(self.output_folder)
        if self.is_ddp:
            shared = [candidate]
            dist.broadcast_object_list(shared, src=0)
            candidate = shared[0]
        return candidate


def _preempted_by(path: str) -> Optional[str]:
    """The signal that stopped the run of a checkpoint, read without loading its tensors; None when it did not stop
    at a preemption request (or cannot be read: the resume that follows would say why)."""
    try:
        state = run_state_of(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
    except Exception:
        return None
    return None if state is None else state.preempted_by
