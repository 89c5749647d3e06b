"""The pretraining reconstruction PNG keeps every label inside the figure, also after nnU-Net's progress plot has
scaled the process's fonts (seaborn ``font_scale=2.5``, which cut the last caption at the figure's edge)."""

import numpy as np
import seaborn

from nnssl.methods.reconstruction_figure import reconstruction_figure, save_reconstruction_png

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
