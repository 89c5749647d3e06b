"""``nnsslFinetunePlanner``: plans a labeled dataset to match a pretraining checkpoint (used by nnssl_prepare_finetune).

The architecture (input/output channels aside) and patch come from the checkpoint's adaptation plan, the
normalisation from its pretraining plan (z-score), the spacing from the adaptation mode:

* ``like_pretrained`` (default): the pretraining spacing (1 mm for nnssl plans);
* ``default_nnunet``: the spacing nnU-Net's default planner picks for this dataset;
* ``fixed``: the spacing given with ``-os``;
* ``no_resample``: no resampling at all (nnU-Net's ``no_resampling_hack``; every case keeps its own grid).

The patch is the checkpoint's recommended downstream patch unless ``patch_size`` (``-ps``) sets another; a Primus is
then built for that patch (``nnssl.finetuning.downstream_patch``).
"""

import os
from typing import List, Optional, Sequence, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.resampling.no_resampling import no_resampling_hack

from nnssl.errors import InvalidValueError
from nnssl.finetuning.adaptation_plan import nnunet_architecture, pretrain_configuration
from nnssl.finetuning.downstream_patch import check_downstream_patch
from nnssl.integration.environment import positive_int_from_environment
from nnssl.plans.nnssl_planner import BATCH_SIZE_VARIABLE, nnsslPlanner

ADAPTATION_MODES = ("like_pretrained", "default_nnunet", "fixed", "no_resample")
FINETUNE_BATCH_SIZE = 2  # nnU-Net's ResEnc-L batch at 160^3 and the nnssl downstream default


class nnsslFinetunePlanner(nnsslPlanner):
    default_plans_name = "nnsslFinetunePlans"
    # recorded in the plans: "pretrained" loads strictly, "dynamic" (nnsslDynamicFinetunePlanner) by name and shape
    architecture_mode = "pretrained"

    def __init__(self, dataset_name_or_id: Union[str, int], checkpoint_path: str, checkpoint: dict,
                 adaptation_mode: str = "like_pretrained", override_spacing: Optional[Sequence[float]] = None,
                 plans_name: Optional[str] = None, patch_size: Optional[Sequence[int]] = None):
        if adaptation_mode not in ADAPTATION_MODES:
            raise InvalidValueError(f"Unknown adaptation mode {adaptation_mode!r}; choose one of {ADAPTATION_MODES}.")
        if (adaptation_mode == "fixed") != (override_spacing is not None):
            raise InvalidValueError("-os/--override_spacing (three floats) goes with -am fixed, and only with it.")
        if override_spacing is not None and len(override_spacing) != 3:
            raise InvalidValueError(f"-os needs three spacings (mm), got {list(override_spacing)}.")
        super().__init__(dataset_name_or_id, plans_name=plans_name)
        self.checkpoint_path = os.path.abspath(checkpoint_path)
        self.checkpoint = checkpoint
        self.adaptation_plan = checkpoint["nnssl_adaptation_plan"]
        self.adaptation_mode = adaptation_mode
        self.override_spacing = override_spacing
        self.downstream_patch = None if patch_size is None else \
            check_downstream_patch(patch_size, nnunet_architecture(self.adaptation_plan))

    def determine_fullres_target_spacing(self) -> np.ndarray:
        if self.adaptation_mode == "fixed":
            return np.array(self.override_spacing, dtype=float)
        pretrain_spacing = pretrain_configuration(self.adaptation_plan).get("spacing")
        if self.adaptation_mode == "like_pretrained" and pretrain_spacing is not None:
            return np.array(pretrain_spacing, dtype=float)
        # default_nnunet, no_resample (spacing only informs the plan), pretraining without a fixed spacing
        return ExperimentPlanner.determine_fullres_target_spacing(self)

    def determine_resampling(self, *args, **kwargs):
        if self.adaptation_mode == "no_resample":
            return no_resampling_hack, {}, no_resampling_hack, {}
        return super().determine_resampling(*args, **kwargs)

    def determine_segmentation_softmax_export_fn(self, *args, **kwargs):
        if self.adaptation_mode == "no_resample":
            return no_resampling_hack, {}
        return super().determine_segmentation_softmax_export_fn(*args, **kwargs)

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        schemes = pretrain_configuration(self.adaptation_plan).get("normalization_schemes") or ["ZScoreNormalization"]
        n_channels = len(self.dataset_json["channel_names"])
        return [schemes[0]] * n_channels, [False] * n_channels

    def batch_size(self) -> int:
        return positive_int_from_environment(BATCH_SIZE_VARIABLE, FINETUNE_BATCH_SIZE)

    def patch_size(self) -> List[int]:
        return self.downstream_patch or [int(i) for i in self.adaptation_plan["recommended_downstream_patchsize"]]

    def architecture(self) -> dict:
        return nnunet_architecture(self.adaptation_plan, self.downstream_patch)

    def extra_plans_fields(self) -> dict:
        plan = self.adaptation_plan
        return {"nnssl_pretrained": {
            "checkpoint": self.checkpoint_path,
            "trainer_name": self.checkpoint.get("trainer_name"),
            "adaptation_mode": self.adaptation_mode,
            "architecture": self.architecture_mode,
            "key_to_encoder": plan.get("key_to_encoder"),
            "key_to_stem": plan.get("key_to_stem"),
            "keys_to_in_proj": plan.get("keys_to_in_proj"),
            "pretrain_num_input_channels": plan.get("pretrain_num_input_channels"),
            "citations": list(self.checkpoint.get("citations") or []),
        }}
