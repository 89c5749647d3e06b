"""The OpenMind baselines on the Primus: VoCo, VolumeFusion and Models Genesis (the reference's "Eva" trainers).

Run as ``nnUNetv2_train ID 3d_fullres all -tr PrimusVoCoPretrainTrainer -p nnsslPlansPrimus`` (plans from
``-pl nnsslPlannerPrimus``; ``nnsslPlansPrimusTiny`` on a CPU). Each is its ResEnc method with the Primus recipe
(AdamW 3e-4, weight decay 5e-2, betas 0.9/0.98, clipping at 1, 5 % linear warm-up, poly; the reference's for every
Eva trainer) and the token-level handling the method needs:
* VoCo: every crop is embedded by the Primus built at the base-crop size (its positional embedding covers one crop,
  64^3 = 512 tokens of 8^3 voxels at full size), as the mean of its EVA output tokens, then the projector (a crop
  that the patch embedding does not tile is refused when the network is built). Exported: the Primus's ``down_projection`` and ``eva``.
* VolumeFusion and Models Genesis: the whole Primus at the plans' patch, its patch decoder predicting the K fusion
  classes or the restored patch. Exported: the whole Primus (fine-tuning copies the patch embedding and the EVA
  encoder; the patch decoder is task specific).
"""

from nnssl import citations
from nnssl.trainers.models_genesis import ModelsGenesisPretrainTrainer
from nnssl.trainers.primus import PrimusPretraining
from nnssl.trainers.variants import define_epoch_variants
from nnssl.trainers.voco import VoCoPretrainTrainer, VoCoPretrainTrainer_momentum
from nnssl.trainers.volume_fusion import VolumeFusionPretrainTrainer

PRIMUS_BASE = (citations.NNUNET, citations.PRIMUS, citations.OPENMIND)


class PrimusVoCoPretrainTrainer(PrimusPretraining, VoCoPretrainTrainer):
    citations = PRIMUS_BASE + (citations.VOCO,)
    resenc_trainer = "VoCoPretrainTrainer"


class PrimusVoCoPretrainTrainer_momentum(PrimusVoCoPretrainTrainer):
    """Base crops embedded by an EMA teacher (see ``VoCoPretrainTrainer_momentum``)."""

    teacher_momentum = VoCoPretrainTrainer_momentum.teacher_momentum


class PrimusVolumeFusionPretrainTrainer(PrimusPretraining, VolumeFusionPretrainTrainer):
    citations = PRIMUS_BASE + (citations.VOLUME_FUSION,)
    resenc_trainer = "VolumeFusionPretrainTrainer"


class PrimusModelsGenesisPretrainTrainer(PrimusPretraining, ModelsGenesisPretrainTrainer):
    citations = PRIMUS_BASE + (citations.MODELS_GENESIS,)
    resenc_trainer = "ModelsGenesisPretrainTrainer"


for _trainer in (PrimusVoCoPretrainTrainer, PrimusVolumeFusionPretrainTrainer, PrimusModelsGenesisPretrainTrainer):
    define_epoch_variants(_trainer, globals())
