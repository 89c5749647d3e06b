"""``progress.png`` of a pretraining run: nnU-Net's three panels (losses, epoch durations, learning rate) without the
"pseudo dice" axis, which a pretraining run has nothing to draw on (it scores no segmentation)."""

from os.path import join
from typing import Dict, List

PANELS = (  # (logged keys and their legend labels, y-axis label)
    ((("train_losses", "loss_tr"), ("val_losses", "loss_val")), "loss"),
    ((("epoch_durations", "epoch duration"),), "time [s]"),
    ((("lrs", "learning rate"),), "learning rate"),
)


def logged_curves(logged: Dict[str, List]) -> Dict[str, List[float]]:
    """The curves of every finished epoch (the epochs that have every value logged, as nnU-Net's logger counts)."""
    keys = ("train_losses", "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps")
    epochs = min(len(logged[k]) for k in keys)
    curves = {k: list(logged[k][:epochs]) for k in ("train_losses", "val_losses", "lrs")}
    curves["epoch_durations"] = [end - start for start, end in zip(logged["epoch_start_timestamps"][:epochs],
                                                                     logged["epoch_end_timestamps"][:epochs])]
    return curves


def progress_figure(logged: Dict[str, List]):
    """The figure for nnU-Net's logging dictionary (``trainer.logger.get_checkpoint()``)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    curves = logged_curves(logged)
    epochs = range(len(curves["lrs"]))
    with plt.style.context("default"):
        figure, axes = plt.subplots(len(PANELS), 1, figsize=(10, 12), layout="constrained")
        for axis, (lines, y_label) in zip(axes, PANELS):
            for key, label in lines:
                axis.plot(epochs, curves[key], label=label, linewidth=2)
            axis.set_xlabel("epoch")
            axis.set_ylabel(y_label)
            axis.legend(loc="upper right")
    return figure


def save_progress_png(logged: Dict[str, List], output_folder: str) -> None:
    import matplotlib.pyplot as plt

    figure = progress_figure(logged)
    figure.savefig(join(output_folder, "progress.png"), dpi=80)
    plt.close(figure)
