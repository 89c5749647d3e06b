"""The pretraining figures: the reconstruction PNG keeps every label inside the figure, also after nnU-Net's progress
plot has scaled the process's fonts (seaborn ``font_scale=2.5``, which cut the last caption at the figure's edge), and
draws the unscored voxels in the colour its caption names; the pretraining progress.png has no pseudo-Dice axis."""

import matplotlib.colors
import numpy as np
import seaborn

from nnssl.methods.progress_figure import progress_figure, save_progress_png
from nnssl.methods.reconstruction_figure import (NOT_SCORED_COLOUR, NOT_SCORED_NOTE, central_slices,
                                                 reconstruction_figure, save_reconstruction_png)

CAPTIONS = ("input", "masked input (what the encoder sees)", "reconstruction",
            "target (masked voxels, where the loss counts)",
            "a caption much longer than one line of the figure, " * 3)


def test_every_label_lies_inside_the_figure_after_nnunets_font_scaling(tmp_path):
    seaborn.set(font_scale=2.5)  # what nnUNetLogger.plot_progress_png does to the whole process
    try:
        panels = {caption: np.random.default_rng(0).random((24, 40, 16)) for caption in CAPTIONS}
        figure = reconstruction_figure(panels, "S3DPretrainTrainer, epoch 12")
        figure.canvas.draw()
        renderer, bounds = figure.canvas.get_renderer(), figure.bbox
        texts = [axis.title for axis in figure.axes] + [text for text in figure.texts if text.get_text()]
        assert len(texts) == len(CAPTIONS) + 1 and all(text.get_text() for text in texts)  # panels' and figure's
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert bounds.x0 <= extent.x0 and extent.x1 <= bounds.x1 and bounds.y0 <= extent.y0 \
                and extent.y1 <= bounds.y1, f"{text.get_text()!r} is cut at the figure's edge"
        save_reconstruction_png(panels, tmp_path / "figure.png", "S3DPretrainTrainer, epoch 12")
        assert (tmp_path / "figure.png").stat().st_size > 0
    finally:
        seaborn.reset_orig()


def test_unscored_voxels_are_drawn_in_the_colour_the_caption_names():
    image = np.random.default_rng(0).random((16, 16, 16))
    target = image.copy()
    target[:8] = np.nan  # the visible blocks of an S3D target
    figure = reconstruction_figure({"input": image, f"target ({NOT_SCORED_NOTE})": target}, "S3DPretrainTrainer")
    drawn = figure.axes[1].get_images()[0]
    rgba = drawn.to_rgba(drawn.get_array())
    unscored = np.isnan(central_slices(target))
    assert unscored.any() and (~unscored).any()
    assert np.allclose(rgba[unscored], matplotlib.colors.to_rgba(NOT_SCORED_COLOUR))
    assert not np.allclose(rgba[~unscored], matplotlib.colors.to_rgba(NOT_SCORED_COLOUR))
    assert NOT_SCORED_COLOUR in figure.axes[1].get_title() and "not scored" in figure.axes[1].get_title()


def test_pretraining_progress_png_has_no_pseudo_dice_axis(tmp_path):
    logged = {"train_losses": [0.9, 0.7, 0.6], "val_losses": [0.95, 0.8, 0.7], "lrs": [1e-2, 9e-3, 8e-3],
              "epoch_start_timestamps": [0.0, 10.0, 20.0], "epoch_end_timestamps": [9.0, 19.5],  # epoch 2 running
              "mean_fg_dice": [float("nan")] * 3, "ema_fg_dice": [float("nan")] * 3,
              "dice_per_class_or_region": [[], [], []]}
    figure = progress_figure(logged)
    assert [axis.get_ylabel() for axis in figure.axes] == ["loss", "time [s]", "learning rate"]
    assert [len(line.get_xdata()) for axis in figure.axes for line in axis.get_lines()] == [2, 2, 2, 2]
    assert list(figure.axes[1].get_lines()[0].get_ydata()) == [9.0, 9.5]
    save_progress_png(logged, str(tmp_path))
    assert (tmp_path / "progress.png").stat().st_size > 0
