"""``nnsslDynamicFinetunePlanner``: plans a labeled dataset as nnU-Net's ResEnc-L planner would, for dynamic
adaptation of a pretrained ResEnc (``nnssl_prepare_finetune --architecture dynamic``).

Spacing (nnU-Net's default for the dataset unless ``-am`` says otherwise), axis order, patch, number of stages,
kernel sizes, strides and batch size come from ``nnUNetPlannerResEncL``'s own topology and memory search on this
dataset. Only the widths and block counts are the checkpoint's (first and largest width, blocks per encoder stage,
convs per decoder stage, the last value repeated for extra stages): they decide which pretrained tensors fit, and for
ResEnc-L they are exactly nnU-Net's ResEnc settings. The normalisation stays the pretraining's (z-score). The
trainer then loads every pretrained tensor whose name and shape fit (``nnssl.finetuning.dynamic_transfer``).
"""

from typing import Sequence, Tuple

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncL

from nnssl.architectures import is_primus
from nnssl.errors import InvalidValueError
from nnssl.finetuning.adaptation_plan import nnunet_architecture
from nnssl.integration.environment import positive_int_from_environment
from nnssl.plans.finetune_planner import nnsslFinetunePlanner
from nnssl.plans.nnssl_planner import BATCH_SIZE_VARIABLE, CONFIGURATION

RESENC_CLASS = "ResidualEncoderUNet"


def extended(values: Sequence[int], length: int) -> Tuple[int, ...]:
    """``values`` with its last entry repeated up to ``length`` entries (settings for stages the checkpoint lacks)."""
    values = tuple(int(v) for v in values)
    return values + values[-1:] * max(0, length - len(values))


class nnsslDynamicFinetunePlanner(nnsslFinetunePlanner):
    default_plans_name = "nnsslDynamicFinetunePlans"
    architecture_mode = "dynamic"
    resenc_planner = nnUNetPlannerResEncL

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pretrained = nnunet_architecture(self.adaptation_plan)
        name = pretrained["network_class_name"].rsplit(".", 1)[-1]
        if name != RESENC_CLASS:
            hint = ("A Primus keeps its pretraining architecture: plan it with the default --architecture pretrained "
                    "(its patch can be changed there)." if is_primus(name) else
                    "Plan it with the default --architecture pretrained.")
            raise InvalidValueError(f"--architecture dynamic plans ResEnc U-Nets as nnU-Net's ResEnc planner does; "
                                    f"{self.checkpoint_path} holds a {name}. {hint}")
        self.pretrained_kwargs = pretrained["arch_kwargs"]

    def determine_transpose(self):
        # nnU-Net's: the axis with the largest spacing first (anisotropic data gets its 1x3x3 stages on axis 0)
        return ExperimentPlanner.determine_transpose(self)

    def nnunet_resenc_configuration(self, spacing: np.ndarray, median_shape: np.ndarray) -> dict:
        """nnU-Net's ResEnc-L ``3d_fullres`` configuration for this dataset, at the checkpoint's widths and blocks."""
        planner = self.resenc_planner(self.dataset_name, plans_name=self.plans_identifier)
        kwargs = self.pretrained_kwargs
        planner.UNet_base_num_features = int(kwargs["features_per_stage"][0])
        planner.UNet_max_features_3d = int(max(kwargs["features_per_stage"]))
        planner.UNet_blocks_per_stage_encoder = extended(kwargs["n_blocks_per_stage"],
                                                         len(planner.UNet_blocks_per_stage_encoder))
        planner.UNet_blocks_per_stage_decoder = extended(kwargs["n_conv_per_stage_decoder"],
                                                         len(planner.UNet_blocks_per_stage_decoder))
        n_voxels = float(np.prod(median_shape, dtype=np.float64) * self.dataset_json["numTraining"])
        return planner.get_plans_for_configuration(spacing, median_shape, self.generate_data_identifier(CONFIGURATION),
                                                   n_voxels, {})

    def fixed_configuration(self, spacing: np.ndarray, median_shape: np.ndarray) -> dict:
        configuration = super().fixed_configuration(spacing, median_shape)
        nnunet = self.nnunet_resenc_configuration(spacing, median_shape)
        architecture = nnunet["architecture"]
        architecture["arch_kwargs"] = {key: list(value) if isinstance(value, tuple) else value
                                       for key, value in architecture["arch_kwargs"].items()}
        architecture["_kw_requires_import"] = list(architecture["_kw_requires_import"])
        configuration.update({
            "patch_size": [int(i) for i in nnunet["patch_size"]],
            "batch_size": positive_int_from_environment(BATCH_SIZE_VARIABLE, int(nnunet["batch_size"])),
            "architecture": architecture,
        })
        return configuration
