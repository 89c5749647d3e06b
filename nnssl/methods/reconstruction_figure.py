"""PNG of one validation case during pretraining: input, masked input, reconstruction, target (central slices)."""

from pathlib import Path
from typing import Dict

import numpy as np


def central_slices(volume: np.ndarray) -> np.ndarray:
    """Three orthogonal central slices of a (X, Y, Z) volume, concatenated side by side (padded to equal height)."""
    x, y, z = (s // 2 for s in volume.shape)
    slices = [volume[x], volume[:, y], volume[:, :, z]]
    height = max(s.shape[0] for s in slices)
    padded = [np.pad(s, ((0, height - s.shape[0]), (0, 0)), constant_values=np.nan) for s in slices]
    return np.concatenate(padded, axis=1)


def save_reconstruction_png(panels: Dict[str, np.ndarray], filename: Path, title: str) -> None:
    """``panels`` maps a caption to a (X, Y, Z) array; all panels share the intensity window of the first one."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    first = next(iter(panels.values()))
    low, high = np.percentile(first[np.isfinite(first)], (0.5, 99.5))
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)))
    for axis, (caption, volume) in zip(np.atleast_1d(axes), panels.items()):
        axis.imshow(central_slices(volume.astype(np.float32)), cmap="gray", vmin=low, vmax=high)
        axis.set_title(caption)
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(filename, dpi=80)
    plt.close(figure)
