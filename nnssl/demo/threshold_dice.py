"""The best Dice any single intensity threshold reaches: a sanity floor for a segmentation task.

A task a threshold solves (Dice near 1) cannot show what a network learned from context, shape or position, and so
cannot show what pretraining transferred.
"""

import numpy as np


def best_threshold_dice(image: np.ndarray, label: np.ndarray, num_thresholds: int = 199) -> float:
    """Max Dice of ``image > t`` or ``image < t`` against ``label > 0`` over quantile-spaced thresholds ``t``."""
    target = label > 0
    values = image.astype(np.float64)
    best = 0.0
    for threshold in np.quantile(values, np.linspace(0.005, 0.995, num_thresholds)):
        for mask in (values > threshold, values < threshold):
            denominator = mask.sum() + target.sum()
            if denominator:
                best = max(best, 2.0 * np.logical_and(mask, target).sum() / denominator)
    return float(best)
