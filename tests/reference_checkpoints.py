"""Tiny checkpoints in the layouts the reference framework (MIC-DKFZ/nnssl) writes, one per (method, backbone).

Built from how the reference's trainers save (documentation/checkpoints.md, "Checkpoints of the reference framework
and OpenMind"): ``torch.save`` of the trainer's dict, whose ``network_weights`` is the whole pretraining module's
state dict and whose ``nnssl_adaptation_plan`` is the reference's ``AdaptationPlan.serialize()``. The modules are
rebuilt from dna parts with the reference's attribute names: its ResEnc encoder is dna's, its EVA MAE module has
dna Primus's ``down_projection`` / ``eva`` / ``up_projection`` / ``mask_token`` (plus an EVA ``decoder`` for MAE),
its contrastive and SwinUNETR models wrap the encoder as ``encoder`` next to their heads. Sizes are the tiny presets
(the reference: ResEnc-L, Primus-M at 160^3, 64^3 contrastive crops, projector width 2048).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from nnssl.presets import PRIMUS_TINY, RESENC_TINY

DOWNSTREAM_PATCH = [64, 64, 64]  # the tiny presets' patch (the reference recommends 160^3)
CROP = [32, 32, 32]  # the contrastive crops (the reference: 64^3)
PROJECTOR_WIDTH = 16  # the reference: 2048
VOLUME_FUSION_CLASSES = 4
RESENC_KEYS = {"key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
               "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
               "key_to_lpe": None}
EVA_KEYS = {"key_to_encoder": "eva", "key_to_stem": "down_projection", "keys_to_in_proj": ["down_projection.proj"],
            "key_to_lpe": "eva.pos_embed"}
WRAPPED_EVA_KEYS = {"key_to_encoder": "encoder.eva", "key_to_stem": "encoder.down_projection",
                    "keys_to_in_proj": ["encoder.down_projection.proj"], "key_to_lpe": "encoder.eva.pos_embed"}


def resenc_unet(num_classes: int = 1) -> nn.Module:
    from conftest import tiny_network

    return tiny_network(num_classes)


def primus(patch_size: Sequence[int], num_classes: int = 1, depth: Optional[int] = None) -> nn.Module:
    from nnssl.architectures import network_from_plans

    arch = PRIMUS_TINY.architecture(patch_size)
    if depth is not None:
        arch["arch_kwargs"]["eva_depth"] = depth
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, num_classes)


def prefixed(prefix: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def projector(in_features: int) -> nn.Module:
    """The reference's VoCo/SimCLR projection head: three linear layers (1-D instance norms without parameters)."""
    head = nn.Module()
    head.layer1 = nn.Sequential(nn.Linear(in_features, PROJECTOR_WIDTH), nn.InstanceNorm1d(PROJECTOR_WIDTH), nn.ReLU())
    head.layer2 = nn.Sequential(nn.Linear(PROJECTOR_WIDTH, PROJECTOR_WIDTH), nn.InstanceNorm1d(PROJECTOR_WIDTH),
                                nn.ReLU())
    head.layer3 = nn.Sequential(nn.Linear(PROJECTOR_WIDTH, PROJECTOR_WIDTH))
    return head


def swin_heads(bottleneck: int, features: Sequence[int], upsamples: Sequence[bool]) -> Dict[str, torch.Tensor]:
    """SwinUNETR pretraining heads: rotation (4 classes) and contrastive (512) linears on the bottleneck, and a
    reconstruction head of 3x3x3 convs along the reversed encoder widths, each upsampling stage adding a parameter-free
    norm, activation and upsampling after its conv."""
    recon = nn.Sequential()
    widths = list(features) + [1]
    for i, upsample in enumerate(upsamples):
        recon.append(nn.Conv3d(widths[i], widths[i + 1], 3, padding=1))
        if upsample:
            recon.extend([nn.InstanceNorm3d(widths[i + 1]), nn.LeakyReLU(), nn.Upsample(scale_factor=2)])
    return {**prefixed("rotation_proj_head.", nn.Linear(bottleneck, 4).state_dict()),
            **prefixed("contrast_proj_head.", nn.Linear(bottleneck, 512).state_dict()),
            **prefixed("recon_proj_head.", recon.state_dict())}


def without(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith(prefix)}


# ------------------------------------------------------------------------------------- network_weights per layout
def resenc_full_unet(num_classes: int = 1) -> Dict[str, torch.Tensor]:
    """MAE, Models Genesis, VolumeFusion (one output per fusion class): the whole dna U-Net."""
    return resenc_unet(num_classes).state_dict()


def resenc_spark() -> Dict[str, torch.Tensor]:
    """S3D/Spark: the inner U-Net, whose ``.conv``/``.norm`` aliases hold untrained tensors (the trained ones are under
    ``all_modules``)."""
    state = resenc_unet().state_dict()
    return {key: torch.randn_like(value) if (".conv." in key or ".norm." in key) and value.is_floating_point()
            else value.clone() for key, value in state.items()}


def resenc_encoder() -> Dict[str, torch.Tensor]:
    return prefixed("encoder.", resenc_unet().encoder.state_dict())


def resenc_contrastive() -> Dict[str, torch.Tensor]:
    """VoCo, SimCLR: the encoder and a projector over the pooled features of every stage."""
    return {**resenc_encoder(), **prefixed("projector.", projector(sum(RESENC_TINY.features_per_stage)).state_dict())}


def resenc_swinunetr() -> Dict[str, torch.Tensor]:
    features = list(reversed(RESENC_TINY.features_per_stage))
    upsamples = [stride[0] > 1 for stride in reversed(RESENC_TINY.strides)]
    return {**resenc_encoder(), **swin_heads(features[0], features, upsamples)}


def eva_mae() -> Dict[str, torch.Tensor]:
    """MAE on Primus: EVA MAE with a 2-block EVA decoder at the pretraining patch."""
    return {**primus(DOWNSTREAM_PATCH).state_dict(),
            **prefixed("decoder.", primus(DOWNSTREAM_PATCH, depth=2).eva.state_dict())}


def eva_patch_decoder(num_classes: int = 1) -> Dict[str, torch.Tensor]:
    """Models Genesis (1 output) and VolumeFusion (one per class) on Primus: the EVA MAE module without decoder."""
    return primus(DOWNSTREAM_PATCH, num_classes).state_dict()


def wrapped_eva(patch_size: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The EVA MAE module without decoder and without up-projection, as the contrastive models' ``encoder``."""
    return prefixed("encoder.", without(primus(patch_size).state_dict(), "up_projection."))


def eva_contrastive() -> Dict[str, torch.Tensor]:
    """VoCo, SimCLR on Primus: the encoder built for the crops (its positional embedding too) and a projector."""
    return {**wrapped_eva(CROP), **prefixed("projector.", projector(PRIMUS_TINY.embed_dim).state_dict())}


def eva_swinunetr() -> Dict[str, torch.Tensor]:
    embed = PRIMUS_TINY.embed_dim
    upsamples = [True, True, True, False]  # log2 of the 8^3 patch embedding, then a last conv
    return {**wrapped_eva(DOWNSTREAM_PATCH), **swin_heads(embed, [embed // 2 ** i for i in range(4)], upsamples)}


# ------------------------------------------------------------------------------------------- adaptation plans
def resenc_architecture_plans() -> dict:
    """The reference's dynamic form (``DynamicArchitecturePlans.serialize``): classes as dotted paths, and the
    names of the keys holding classes."""
    kwargs = RESENC_TINY.architecture()["arch_kwargs"]
    kwargs.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                  nonlin="torch.nn.modules.activation.LeakyReLU")
    return {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": kwargs,
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]}


def primus_architecture_plans() -> dict:
    """The reference writes the preset name "PrimusM" (built at the recommended patch); the tiny Primus is written in
    nnssl's dynamic form so that the test network is tiny."""
    return {"arch_class_name": "Primus", "arch_kwargs": PRIMUS_TINY.architecture(DOWNSTREAM_PATCH)["arch_kwargs"],
            "arch_kwargs_requiring_import": []}


def pretrain_plan(patch_size: Sequence[int]) -> dict:
    """``Plan.serialize()`` with its one trained configuration (the contrastive trainers record their crop size)."""
    return {
        "dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
        "original_median_spacing_after_transp": [1, 1, 1], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "FixedResEncUNetPlanner",
        "configurations": {"onemmiso": {
            "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
            "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_mask": "resample_data_or_seg_to_shape",
            "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "spacing": [1, 1, 1], "patch_size": list(patch_size)}},
    }


def adaptation_plan(architecture_plans: dict, keys: dict, pretrain_patch: Sequence[int]) -> dict:
    return {"architecture_plans": architecture_plans, "pretrain_plan": pretrain_plan(pretrain_patch),
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": list(DOWNSTREAM_PATCH), **keys}


@dataclass(frozen=True)
class ReferenceLayout:
    """One (method, backbone) of the reference: its trainer, weights, prefixes, pretraining patch, dropped groups."""

    trainer_name: str
    weights: Callable[[], Dict[str, torch.Tensor]]
    primus: bool
    keys: dict
    dropped: Tuple[str, ...]
    pretrain_patch: Tuple[int, ...] = tuple(DOWNSTREAM_PATCH)

    def plan(self) -> dict:
        architecture = primus_architecture_plans() if self.primus else resenc_architecture_plans()
        return adaptation_plan(architecture, self.keys, self.pretrain_patch)

    def checkpoint(self, seed: int = 0) -> dict:
        """The dict the reference's ``save_checkpoint`` writes (optimizer and logger state reduced to stand-ins)."""
        torch.manual_seed(seed)
        return {"network_weights": self.weights(), "optimizer_state": {"state": {}, "param_groups": []},
                "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": 1000,
                "init_args": {"configuration_name": "onemmiso", "fold": 0}, "trainer_name": self.trainer_name,
                "nnssl_adaptation_plan": self.plan()}


UNET_DROPPED = ("decoder.encoder.*", "decoder.*", "decoder.seg_layers.*")
LAYOUTS = {
    "mae_resenc": ReferenceLayout("BaseMAETrainer", resenc_full_unet, False, RESENC_KEYS, UNET_DROPPED),
    "s3d_resenc": ReferenceLayout("SparkMAETrainer", resenc_spark, False, RESENC_KEYS, UNET_DROPPED),
    "models_genesis_resenc": ReferenceLayout("ModelGenesisTrainer", resenc_full_unet, False, RESENC_KEYS,
                                             UNET_DROPPED),
    "volume_fusion_resenc": ReferenceLayout("VolumeFusionTrainer", lambda: resenc_full_unet(VOLUME_FUSION_CLASSES),
                                            False, RESENC_KEYS, UNET_DROPPED),
    "voco_resenc": ReferenceLayout("VoCoTrainer", resenc_contrastive, False, RESENC_KEYS, ("projector.*",),
                                   tuple(CROP)),
    "simclr_resenc": ReferenceLayout("SimCLRTrainer", resenc_contrastive, False, RESENC_KEYS, ("projector.*",),
                                     tuple(CROP)),
    "swinunetr_resenc": ReferenceLayout("SwinUNETRTrainer", resenc_swinunetr, False, RESENC_KEYS,
                                        ("rotation_proj_head.*", "contrast_proj_head.*", "recon_proj_head.*")),
    "mae_primus": ReferenceLayout("BaseEvaMAETrainer", eva_mae, True, EVA_KEYS,
                                  ("up_projection.*", "mask_token", "decoder.*")),
    "models_genesis_primus": ReferenceLayout("ModelGenesisEvaTrainer", eva_patch_decoder, True, EVA_KEYS,
                                             ("up_projection.*", "mask_token")),
    "volume_fusion_primus": ReferenceLayout("VolumeFusionEvaTrainer", lambda: eva_patch_decoder(VOLUME_FUSION_CLASSES),
                                            True, EVA_KEYS, ("up_projection.*", "mask_token")),
    "voco_primus": ReferenceLayout("VoCoEvaTrainer", eva_contrastive, True, WRAPPED_EVA_KEYS,
                                   ("encoder.mask_token", "projector.*"), tuple(CROP)),
    "simclr_primus": ReferenceLayout("SimCLREvaTrainer", eva_contrastive, True, WRAPPED_EVA_KEYS,
                                     ("encoder.mask_token", "projector.*"), tuple(CROP)),
    "swinunetr_primus": ReferenceLayout("SwinUNETREvaTrainer", eva_swinunetr, True, WRAPPED_EVA_KEYS,
                                        ("encoder.mask_token", "rotation_proj_head.*", "contrast_proj_head.*",
                                         "recon_proj_head.*")),
}


def spark_checkpoint_as_saved(seed: int = 0) -> dict:
    """What the reference's Spark trainers save: no adaptation plan, the SparK model's own state under spark_weights
    (the reference's ``add_adaptation_plan`` utility adds the plan and removes spark_weights)."""
    checkpoint = LAYOUTS["s3d_resenc"].checkpoint(seed)
    checkpoint.pop("nnssl_adaptation_plan")
    checkpoint["spark_weights"] = {**prefixed("architecture.", checkpoint["network_weights"]),
                                   "mask_tokens.0": torch.zeros(1, RESENC_TINY.features_per_stage[0], 1, 1, 1)}
    return checkpoint
