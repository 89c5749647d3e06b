"""``nnsslTrainer``: nnU-Net's default supervised training, with nnssl's schedule controls, for nnssl plans."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.trainers.base import nnsslTrainerMixin
from nnssl.trainers.variants import define_epoch_variants


class nnsslTrainer(nnsslTrainerMixin, nnUNetTrainer):
    """Stock nnU-Net supervised training (SGD 1e-2, poly, deep supervision) honouring the ``nnssl_*`` variables."""


define_epoch_variants(nnsslTrainer, globals())
