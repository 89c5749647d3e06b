"""Behaviour shared by every nnssl trainer, layered onto nnU-Net's ``nnUNetTrainer`` as a mixin."""

from typing import Optional

from nnssl.schedule import apply_schedule_overrides


class nnsslTrainerMixin:
    """Schedule handling common to all nnssl trainers.

    Applied right before nnU-Net builds the optimizer and LR schedule in ``initialize()``: first the length of a
    ``_Nepochs`` variant (``fixed_num_epochs``), then the ``nnssl_*`` smoke-run variables, which win over both.
    """

    fixed_num_epochs: Optional[int] = None

    def initialize(self):
        if not self.was_initialized:
            if self.fixed_num_epochs is not None:
                self.num_epochs = self.fixed_num_epochs
            applied = apply_schedule_overrides(self)
            if applied:
                self.print_to_log_file(f"nnssl schedule overrides from the environment: {applied}")
        super().initialize()
