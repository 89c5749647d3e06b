"""Augmentation pipelines (batchgeneratorsv2) shared by the pretraining trainers and spatial-only fine-tuning.

The pretraining spatial augmentation also runs batched on the training device (``nnssl.device_augmentation``), from
the same constants.
"""

from typing import Sequence, Tuple

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

# reference S3D pretraining: rotation +-30 deg (p 0.2), scaling 0.7..1.4 (p 0.2), mirroring, no intensity changes
PRETRAINING_SCALING = (0.7, 1.4)
PRETRAINING_ROTATION = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
PRETRAINING_P_ROTATION = 0.2
PRETRAINING_P_SCALING = 0.2


def spatial_transforms(patch_size: Sequence[int], rotation: Tuple[float, float],
                                   mirror_axes: Sequence[int]) -> BasicTransform:
    """Rotation, scaling and mirroring applied identically to the image and its region map (nnU-Net's "target").

    The reconstruction target is the augmented image itself, so input and target always share the spatial transform.
    Voxels outside the image (region -1 after nnU-Net's crop/padding) become region 0.
    """
    transforms = [
        SpatialTransform(
            patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=PRETRAINING_P_ROTATION, rotation=rotation, p_scaling=PRETRAINING_P_SCALING,
            scaling=PRETRAINING_SCALING,
            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
            padding_value_seg=-1,
        ),
    ]
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    transforms.append(RemoveLabelTansform(-1, 0))
    return ComposeTransforms(transforms)

