"""Behaviour shared by every nnssl trainer, layered onto nnU-Net's ``nnUNetTrainer`` as a mixin."""

from typing import Optional

from nnssl.integration.environment import flag_from_environment
from nnssl.integration.fork_safety import prepare_forked_children
from nnssl.integration.smoke_run import (TORCH_THREADS_VARIABLE, VALIDATION_TTA_OFF_VARIABLE,
                                         apply_schedule_overrides, apply_torch_threads_override)
from nnssl.integration.seeding import SEED_VARIABLE, seed_from_environment, seed_process, stream_seed
from nnssl.trainers.resumable import nnsslResumableTraining


class nnsslTrainerMixin(nnsslResumableTraining):
    """Schedule and seeding common to all nnssl trainers.

    Applied right before nnU-Net builds the network, optimizer and LR schedule in ``initialize()``: first the length
    of a ``_Nepochs`` variant of nnU-Net's recipe (``fixed_num_epochs``; trainers with a recipe dataclass carry their
    length in it), then the ``nnssl_*`` smoke-run variables, which win over both;
    with ``nnssl_seed`` set, the process is seeded there too, and ``get_dataloaders`` builds seeded augmenters.
    ``nnssl_val_disable_tta=1`` validates without mirroring (8x faster on 3D; the checkpoint keeps its mirroring
    axes, so ``nnUNetv2_predict`` still mirrors); ``nnssl_torch_threads=N`` replaces nnU-Net's one torch thread
    per core on the CPU.
    """

    fixed_num_epochs: Optional[int] = None

    def initialize(self):
        if not self.was_initialized:
            prepare_forked_children()  # before any augmentation worker is forked
            if self.fixed_num_epochs is not None:
                self.num_epochs = self.fixed_num_epochs
            applied = apply_schedule_overrides(self)
            if applied:
                self.print_to_log_file(f"nnssl schedule overrides from the environment: {applied}")
            threads = apply_torch_threads_override()
            if threads is not None:
                self.print_to_log_file(f"{TORCH_THREADS_VARIABLE}: torch uses {threads} intra-op thread(s)")
            seed = seed_from_environment()
            if seed is not None:
                seed_process(stream_seed(seed, self.nnssl_rank))
                self.print_to_log_file(f"{SEED_VARIABLE}={seed}: Python, numpy, torch and the augmentation workers "
                                       f"are seeded (rank {self.nnssl_rank})")
        super().initialize()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not flag_from_environment(VALIDATION_TTA_OFF_VARIABLE):
            return super().perform_actual_validation(save_probabilities)
        axes, self.inference_allowed_mirroring_axes = self.inference_allowed_mirroring_axes, None
        self.print_to_log_file(f"{VALIDATION_TTA_OFF_VARIABLE}: validation without mirroring")
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes
