"""Checks every nnssl trainer makes on what the user gave it, so that mistakes end in one line (``nnssl.errors``).

A mixin of its own, below ``nnsslTrainerMixin``: a fold the dataset is too small for and what a Ctrl-C keeps (a
checkpoint that cannot be read is reported by ``nnsslResumableTraining.load_checkpoint``).
"""

from functools import partial

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from batchgenerators.utilities.file_and_folder_operations import join

from nnssl.integration.checkpoint import kept_checkpoints_note
from nnssl.integration.folds import check_fold_has_cases, check_fold_is_trainable
from nnssl.integration.user_errors import report_kept_on_interrupt


class nnsslInputGuards:
    """Layered onto ``nnUNetTrainer``; every method ends in nnU-Net's own."""

    def do_split(self):
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        num_cases = len(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        check_fold_has_cases(self.fold, num_cases, self.plans_manager.dataset_name, splits_file)
        training_cases, validation_cases = super().do_split()
        check_fold_is_trainable(self.fold, training_cases, splits_file)
        return training_cases, validation_cases

    def on_train_start(self):
        report_kept_on_interrupt(partial(kept_checkpoints_note, self.output_folder))
        super().on_train_start()
