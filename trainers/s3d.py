"""``S3DPretrainTrainer`` (sparse masked autoencoder, the S3D recipe) and its dense ablation ``MAEPretrainTrainer``.

Run as ``nnUNetv2_train ID 3d_fullres all -tr S3DPretrainTrainer -p nnsslPlans``. Masks are 16^3-voxel blocks on a
grid aligned with the encoder stages, a masked fraction drawn once per batch from U(0.6, 0.9) (``_ratio75``: fixed
0.75; ``_block32``: the paper text's bottleneck-aligned 32^3 blocks), a different pattern per sample. The loss is
the MSE over masked voxels; anonymised voxels (ingested with an anonymisation mask) never count, and the
``_anatomy`` variant restricts the loss to the anatomy mask as well.
"""

from dataclasses import replace
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from nnssl import citations
from nnssl.errors import UserError
from nnssl.integration.distributed import gather_from_all_ranks
from nnssl.integration.seeding import MASK_STREAM, seeded_stream
from nnssl.methods.mae_models import DenseMAEModel, S3DModel
from nnssl.methods.masking import BlockMaskSampler, MaskingConfig, upsample_mask
from nnssl.methods.reconstruction_figure import NOT_SCORED_NOTE
from nnssl.methods.reconstruction_loss import masked_reconstruction_loss
from nnssl.trainers.pretraining import nnsslPretrainTrainer
from nnssl.trainers.variants import define_epoch_variants

ANATOMY_LABEL = 1
ANONYMISED_LABEL = 2


class S3DPretrainTrainer(nnsslPretrainTrainer):
    citations = citations.PRETRAINING_BASE + (citations.S3D, citations.SPARK)
    masking = MaskingConfig()
    mask_seed = 12345
    restrict_loss_to_anatomy = False
    spatial_augmentation_on_device = True

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_sampler: Optional[BlockMaskSampler] = None
        ingest_info = dataset_json.get("nnssl", {})
        self.exclude_anonymised = bool(ingest_info.get("anonymization_masks", False))
        if self.restrict_loss_to_anatomy and not ingest_info.get("unlabeled", False):
            raise UserError(f"{self.__class__.__name__} restricts the loss to the anatomy label of an nnssl_ingest "
                            f"dataset, but this dataset.json has no 'nnssl' ingest block. Ingest the images with "
                            f"nnssl_ingest or use S3DPretrainTrainer.")

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return S3DModel(network)

    def initialize(self):
        super().initialize()
        if self.mask_sampler is None:
            # under nnssl_seed every rank takes rank 0's mask stream: the ratio stream must be the same on all
            # ranks (the sampler derives each rank's pattern stream from it)
            seeded = seeded_stream(0, MASK_STREAM)
            mask_seed = self.mask_seed if seeded is None else seeded
            self.mask_sampler = BlockMaskSampler(self.configuration_manager.patch_size, self.masking,
                                                 seed=mask_seed, rank=self.nnssl_rank)
            self.print_to_log_file(f"Masking: {self.masking}, mask seed {mask_seed}")

    @property
    def needs_region_map(self) -> bool:
        return self.restrict_loss_to_anatomy or self.exclude_anonymised

    def loss_region(self, region_map: torch.Tensor) -> Optional[torch.Tensor]:
        """Voxels allowed in the loss, from nnU-Net's "target" (the placeholder label map of ingested data)."""
        if self.restrict_loss_to_anatomy:
            return region_map == ANATOMY_LABEL
        if self.exclude_anonymised:
            return region_map != ANONYMISED_LABEL
        return None

    def batch_loss_region(self, batch: dict) -> Optional[torch.Tensor]:
        """``loss_region`` of the batch's region map on the device; None (nothing read) when the loss needs none."""
        if not self.needs_region_map:
            return None
        return self.loss_region(batch["target"].to(self.device, non_blocking=True))

    def _predict(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        mask = self.mask_sampler.sample(data.shape[0], self.device)
        return data, mask, self.network(data, mask)

    def compute_loss(self, batch: dict, train: bool) -> torch.Tensor:
        if train:
            batch = self.device_training_batch(batch)
        data, mask, prediction = self._predict(batch)
        return masked_reconstruction_loss(prediction, data, mask, self.batch_loss_region(batch))

    def reconstruction_panels(self, batch: dict) -> Optional[Dict[str, np.ndarray]]:
        data, mask, prediction = self._predict(batch)
        visible = upsample_mask(mask, data.shape[2:])[0, 0].cpu().numpy() > 0
        image = data[0, 0].float().cpu().numpy()
        target = np.where(visible, np.nan, image)
        return {
            "input": image,
            "masked input (what the encoder sees)": np.where(visible, image, 0),
            "reconstruction": prediction[0, 0].float().cpu().numpy(),
            f"target: the masked voxels, where the loss counts ({NOT_SCORED_NOTE})": target,
        }

    def extra_state(self) -> dict:
        """The mask streams of every rank (under DDP the ratio stream is the same on all ranks, each rank draws its
        own patterns, and a resumed rank continues its own); ``mask_sampler`` is rank 0's."""
        states = gather_from_all_ranks(self.mask_sampler.state_dict())
        return {"mask_sampler": states[0], "mask_sampler_per_rank": states}

    def load_extra_state(self, state: dict) -> None:
        if "mask_sampler" not in state:
            return
        per_rank = state.get("mask_sampler_per_rank", [state["mask_sampler"]])
        rank = self.mask_sampler.rank
        # a rank the saved run did not have: the shared ratio stream, its own fresh pattern stream (seed, rank)
        own = per_rank[rank] if rank < len(per_rank) else {**per_rank[0], "pattern_rng": None}
        self.mask_sampler.load_state_dict(own)


class S3DPretrainTrainer_ratio75(S3DPretrainTrainer):
    """Fixed 75 % mask ratio (the reference's SparkMAETrainer)."""

    masking = MaskingConfig(ratio_range=(0.75, 0.75))


class S3DPretrainTrainer_block32(S3DPretrainTrainer):
    """32^3-voxel mask blocks: the bottleneck-aligned grid of the paper text (5^3 at 160^3)."""

    masking = MaskingConfig(block_size=32)


class S3DPretrainTrainer_fp16(S3DPretrainTrainer):
    """fp16 autocast with a GradScaler on CUDA (as the reference) instead of bf16."""

    recipe = replace(S3DPretrainTrainer.recipe, precision="fp16")


class S3DPretrainTrainer_cpuDA(S3DPretrainTrainer):
    """Spatial augmentation in the CPU workers (batchgeneratorsv2), as before device augmentation: same
    distribution, the slower pipeline; for hosts where a read patch per sample is too much to send to the GPU."""

    spatial_augmentation_on_device = False


class S3DPretrainTrainer_anatomy(S3DPretrainTrainer):
    """Loss restricted to the anatomy mask given at ingest (OpenMind-style anatomy masks)."""

    restrict_loss_to_anatomy = True


class MAEPretrainTrainer(S3DPretrainTrainer):
    """Dense MAE ablation: zero-masked input through the unmodified network, same masks and loss, no sparse ops."""

    citations = citations.PRETRAINING_BASE + (citations.MAE,)

    def wrap_network(self, network: nn.Module) -> nn.Module:
        return DenseMAEModel(network)


class MAEPretrainTrainer_ratio75(MAEPretrainTrainer):
    masking = MaskingConfig(ratio_range=(0.75, 0.75))


for _trainer in (S3DPretrainTrainer, S3DPretrainTrainer_ratio75, MAEPretrainTrainer):
    define_epoch_variants(_trainer, globals())
