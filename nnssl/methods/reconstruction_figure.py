"""PNG of one validation case during pretraining: input, masked input, reconstruction, target (central slices)."""

import textwrap
from pathlib import Path
from typing import Dict

import numpy as np

FIGURE_WIDTH_INCHES = 9
CAPTION_CHARACTERS_PER_LINE = 80  # at matplotlib's default title size, 80 characters fit in 9 inches
NOT_SCORED_COLOUR = "white"  # NaN voxels of a panel: in a masked target, the visible voxels that the loss skips
NOT_SCORED_NOTE = f"{NOT_SCORED_COLOUR} blocks: visible voxels, not scored"


def central_slices(volume: np.ndarray) -> np.ndarray:
    """Three orthogonal central slices of a (X, Y, Z) volume, concatenated side by side (padded to equal height)."""
    x, y, z = (s // 2 for s in volume.shape)
    slices = [volume[x], volume[:, y], volume[:, :, z]]
    height = max(s.shape[0] for s in slices)
    padded = [np.pad(s, ((0, height - s.shape[0]), (0, 0)), constant_values=np.nan) for s in slices]
    return np.concatenate(padded, axis=1)


def reconstruction_figure(panels: Dict[str, np.ndarray], title: str):
    """One row per panel; ``panels`` maps a caption to a (X, Y, Z) array, and all panels share the intensity window
    of the first one. NaN voxels are drawn in ``NOT_SCORED_COLOUR`` (say so in the caption, ``NOT_SCORED_NOTE``).

    Drawn in matplotlib's default style: nnU-Net's progress plot sets seaborn's ``font_scale=2.5`` for the whole
    process, at which the captions no longer fit. Captions are also wrapped and the layout is constrained, so that
    no label is cut at the figure's edge."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    colour_map = matplotlib.colormaps["gray"].with_extremes(bad=NOT_SCORED_COLOUR)
    first = next(iter(panels.values()))
    low, high = np.percentile(first[np.isfinite(first)], (0.5, 99.5))
    with plt.style.context("default"):
        figure, axes = plt.subplots(len(panels), 1, figsize=(FIGURE_WIDTH_INCHES, 3.2 * len(panels)),
                                    layout="constrained")
        for axis, (caption, volume) in zip(np.atleast_1d(axes), panels.items()):
            axis.imshow(central_slices(volume.astype(np.float32)), cmap=colour_map, vmin=low, vmax=high)
            axis.set_title(textwrap.fill(caption, CAPTION_CHARACTERS_PER_LINE))
            axis.axis("off")
        figure.suptitle(textwrap.fill(title, CAPTION_CHARACTERS_PER_LINE))
    return figure


def save_reconstruction_png(panels: Dict[str, np.ndarray], filename: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    figure = reconstruction_figure(panels, title)
    figure.savefig(filename, dpi=80)
    plt.close(figure)
