"""``nnsslPlanner`` / ``nnsslPlannerTiny`` (ResEnc) and ``nnsslPlannerPrimus`` / ``nnsslPlannerPrimusTiny`` (Primus):
fixed 1 mm plans for ``nnUNetv2_plan_and_preprocess -pl``.

Unlike nnU-Net's planners nothing here depends on the dataset's shapes: every dataset (unlabeled pretraining data
or a labeled downstream task) gets the same single ``3d_fullres`` configuration, so pretrained encoders transfer.
Images smaller than the patch are padded by nnU-Net's data loader, never rejected.
"""

import os
import shutil
from typing import List, Optional, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from nnssl.integration.environment import positive_int_from_environment
from nnssl.presets import (PRIMUS_M, PRIMUS_TINY, RESENC_L, RESENC_MINI, RESENC_TINY, PrimusPreset,
                           ResEncPreset)

BATCH_SIZE_VARIABLE = "nnssl_batch_size"
CONFIGURATION = "3d_fullres"


class nnsslPlanner(ExperimentPlanner):
    """ResEnc-L at 1x1x1 mm, z-score, patch 160^3, batch 6 (``nnssl_batch_size`` overrides), plans ``nnsslPlans``."""

    preset: Union[ResEncPreset, PrimusPreset] = RESENC_L
    default_plans_name = "nnsslPlans"

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: Optional[str] = None,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...], None] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)

    def determine_fullres_target_spacing(self) -> np.ndarray:
        if self.overwrite_target_spacing is not None:
            return np.array(self.overwrite_target_spacing, dtype=float)
        return np.array(self.preset.spacing, dtype=float)

    def determine_transpose(self):
        # the target spacing is isotropic, so nnU-Net's "largest spacing first" reordering buys nothing
        return [0, 1, 2], [0, 1, 2]

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        n_channels = len(self.dataset_json["channel_names"])
        return ["ZScoreNormalization"] * n_channels, [False] * n_channels

    def batch_size(self) -> int:
        return positive_int_from_environment(BATCH_SIZE_VARIABLE, self.preset.batch_size)

    def patch_size(self) -> List[int]:
        return list(self.preset.patch_size)

    def architecture(self) -> dict:
        return self.preset.architecture()

    def fixed_configuration(self, spacing: np.ndarray, median_shape: np.ndarray) -> dict:
        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, use_mask_for_norm = \
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        return {
            "data_identifier": self.generate_data_identifier(CONFIGURATION),
            "preprocessor_name": self.preprocessor_name,
            "batch_size": self.batch_size(),
            "patch_size": self.patch_size(),
            "median_image_size_in_voxels": [float(i) for i in median_shape],
            "spacing": [float(i) for i in spacing],
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": use_mask_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": self.architecture(),
            "batch_dice": False,
        }

    def extra_plans_fields(self) -> dict:
        """Top-level plans entries that record where the plan came from (nnU-Net ignores unknown keys)."""
        return {"nnssl_preset": self.preset.name}

    def plan_experiment(self) -> dict:
        transpose_forward, transpose_backward = self.determine_transpose()
        spacing = self.determine_fullres_target_spacing()
        fingerprint = self.dataset_fingerprint
        new_shapes = [compute_new_shape(shape, old_spacing, spacing)
                      for old_spacing, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
        # like nnU-Net, the plans hold spacings and shapes in the transposed axis order (identity for fixed plans)
        median_shape = np.median(new_shapes, 0)[transpose_forward]
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [float(i) for i in
                                                     np.median(fingerprint["spacings"], 0)[transpose_forward]],
            "original_median_shape_after_transp": [int(round(i)) for i in
                                                   np.median(fingerprint["shapes_after_crop"], 0)[transpose_forward]],
            "image_reader_writer": self.determine_reader_writer().__name__,
            "transpose_forward": [int(i) for i in transpose_forward],
            "transpose_backward": [int(i) for i in transpose_backward],
            "configurations": {CONFIGURATION: self.fixed_configuration(spacing[transpose_forward], median_shape)},
            "experiment_planner_used": self.__class__.__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel":
                fingerprint["foreground_intensity_properties_per_channel"],
        }
        plans.update(self.extra_plans_fields())
        os.makedirs(join(nnUNet_preprocessed, self.dataset_name), exist_ok=True)
        shutil.copy(join(self.raw_dataset_folder, "dataset.json"),
                    join(nnUNet_preprocessed, self.dataset_name, "dataset.json"))
        self.plans = plans
        self.save_plans(plans)
        return plans


class nnsslPlannerTiny(nnsslPlanner):
    """Same family at CPU size (ResEnc, 1 mm, patch 64^3, 5 stages, 8..64 features, batch 2): plans ``nnsslPlansTiny``."""

    preset = RESENC_TINY
    default_plans_name = "nnsslPlansTiny"


class nnsslPlannerMini(nnsslPlanner):
    """The tiny network at 1.5 mm with a 48^3 patch (the transfer probe's CPU preset): plans ``nnsslPlansMini``."""

    preset = RESENC_MINI
    default_plans_name = "nnsslPlansMini"


class nnsslPlannerPrimus(nnsslPlanner):
    """Primus-M (embed 864, 8^3 patch embedding, 16 EVA blocks, 12 heads; nnU-Net's Primus-M trainer's settings) at
    1x1x1 mm, z-score, patch 160^3, batch 8: plans ``nnsslPlansPrimus``."""

    preset = PRIMUS_M
    default_plans_name = "nnsslPlansPrimus"


class nnsslPlannerPrimusTiny(nnsslPlanner):
    """The Primus family at CPU size (1 mm, patch 64^3, 8^3 tokens, embed 96, 2 blocks, 2 heads, batch 2): plans
    ``nnsslPlansPrimusTiny``."""

    preset = PRIMUS_TINY
    default_plans_name = "nnsslPlansPrimusTiny"
