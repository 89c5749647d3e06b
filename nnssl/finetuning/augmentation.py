"""Spatial-only augmentation for segmentation fine-tuning (AMAES: intensity augmentations during fine-tuning led to
catastrophic forgetting of the pretrained representation)."""

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

from nnssl.augmentation import spatial_transforms


def spatial_only_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                     do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                     foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
    """Drop-in for ``nnUNetTrainer.get_training_transforms`` (same signature) without deep supervision."""
    if deep_supervision_scales is not None or is_cascaded or do_dummy_2d_data_aug:
        raise ValueError("Spatial-only fine-tuning supports 3D, non-cascaded training without deep supervision.")
    transforms = [spatial_transforms(patch_size, rotation_for_DA, mirror_axes)]
    if regions is not None:
        transforms.append(ConvertSegmentationToRegionsTransform(
            regions=list(regions) + [ignore_label] if ignore_label is not None else regions, channel_in_seg=0))
    return ComposeTransforms(transforms)
