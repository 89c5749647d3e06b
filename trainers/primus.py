"""``PrimusMAEPretrainTrainer``: MAE pretraining of the Primus transformer with real token dropping.

Run as ``nnUNetv2_train ID 3d_fullres all -tr PrimusMAEPretrainTrainer -p nnsslPlansPrimus``. Masks are 8^3-voxel
blocks, one per token of the 8^3 patch embedding, 75 % of them masked (``_dynamic``: a ratio drawn once per batch
from U(0.6, 0.9) as S3D's default; ``_block16``: 16^3 blocks of 8 tokens each); the EVA encoder processes the
visible tokens only (``nnssl.methods.primus_mae``). The loss, the mask streams (seeding, DDP, resume), the
reconstruction figures and the checkpoint format are S3D's; the recipe is the reference's Primus MAE recipe
(``PRIMUS_MAE_RECIPE``: AdamW 3e-4, warm-up, poly).
"""

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnssl import citations
from nnssl.architectures import is_primus
from nnssl.errors import UserError
from nnssl.methods.masking import MaskingConfig
from nnssl.methods.primus_mae import PrimusMAEModel, TokenDecoderConfig
from nnssl.methods.recipe import PRIMUS_MAE_RECIPE
from nnssl.trainers.s3d import S3DPretrainTrainer
from nnssl.trainers.variants import define_epoch_variants


def require_primus_plans(trainer_name: str, configuration_manager: ConfigurationManager, plans_name: str,
                         resenc_trainer: str) -> None:
    """A Primus trainer needs Primus plans; ``resenc_trainer`` is the method's trainer for ResEnc plans."""
    name = configuration_manager.network_arch_class_name
    if not is_primus(name):
        raise UserError(f"{trainer_name} pretrains a Primus, but the plans {plans_name} build {name}. Plan the "
                        f"dataset with -pl nnsslPlannerPrimus (or nnsslPlannerPrimusTiny) and train with "
                        f"-p nnsslPlansPrimus, or use {resenc_trainer} for ResEnc plans.")



def require_unet_plans(trainer_name: str, configuration_manager: ConfigurationManager, plans_name: str,
                       primus_trainer: str) -> None:
    """A U-Net trainer refuses Primus plans; ``primus_trainer`` is the method's trainer for them."""
    name = configuration_manager.network_arch_class_name
    if is_primus(name):
        raise UserError(f"{trainer_name} pretrains a ResEnc U-Net, but the plans {plans_name} build {name}: use "
                        f"{primus_trainer} for Primus plans.")

def check_mask_blocks(trainer_name: str, configuration_manager: ConfigurationManager, masking: MaskingConfig) -> None:
    """Mask blocks made of whole tokens (else masked voxels leak into visible tokens, or nothing is dropped)."""
    embedding = configuration_manager.network_arch_init_kwargs["patch_embed_size"]
    if any(masking.block_size % int(e) for e in embedding):
        raise UserError(f"{trainer_name}: mask block size {masking.block_size} is not a multiple of the Primus "
                        f"patch embedding {list(embedding)}: token dropping masks whole tokens.")


class PrimusPretraining:
    """Mixin (first base) that moves a pretraining method onto the Primus: Primus plans are required, and the
    recipe is the reference's for every Primus ("Eva") trainer, MAE and baselines alike (``PRIMUS_MAE_RECIPE``)."""

    recipe = PRIMUS_MAE_RECIPE
    resenc_trainer = ""  # the same method's trainer for ResEnc plans, named when the plans build no Primus

    def check_plans(self) -> None:
        require_primus_plans(self.__class__.__name__, self.configuration_manager, self.plans_manager.plans_name,
                             self.resenc_trainer)


class PrimusMAEPretrainTrainer(PrimusPretraining, S3DPretrainTrainer):
    citations = (citations.NNUNET, citations.PRIMUS, citations.OPENMIND, citations.MAE)
    resenc_trainer = "S3DPretrainTrainer"
    masking = MaskingConfig(block_size=8, ratio_range=(0.75, 0.75))
    decoder = TokenDecoderConfig()

    def check_plans(self) -> None:
        super().check_plans()
        check_mask_blocks(self.__class__.__name__, self.configuration_manager, self.masking)

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return PrimusMAEModel(network, self.configuration_manager.patch_size, self.decoder)


class PrimusMAEPretrainTrainer_dynamic(PrimusMAEPretrainTrainer):
    """Mask ratio drawn once per batch from U(0.6, 0.9) (S3D's default) instead of a fixed 75 %."""

    masking = MaskingConfig(block_size=8, ratio_range=(0.6, 0.9))


class PrimusMAEPretrainTrainer_block16(PrimusMAEPretrainTrainer):
    """16^3-voxel mask blocks (2^3 tokens each), 75 % masked."""

    masking = MaskingConfig(block_size=16, ratio_range=(0.75, 0.75))


for _trainer in (PrimusMAEPretrainTrainer, PrimusMAEPretrainTrainer_dynamic):
    define_epoch_variants(_trainer, globals())
