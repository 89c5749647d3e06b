"""``progress.png`` of a pretraining run: nnU-Net's three panels (losses, epoch durations, learning rate) without the
"pseudo dice" axis, which a pretraining run has nothing to draw on (it scores no segmentation). With the periodic
probe on, its Dice per probed epoch (and the random-encoder floor) is drawn on a second axis of the loss panel."""

from os.path import join
from typing import Dict, List, Mapping, Optional

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


def progress_figure(logged: Dict[str, List], probe_dice: Optional[Mapping[int, float]] = None,
                    probe_floor: Optional[float] = None):
    """The figure for nnU-Net's logging dictionary (``trainer.logger.get_checkpoint()``) and the periodic probe's
    Dice per epoch."""
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
        if probe_dice:
            draw_probe(axes[0], probe_dice, probe_floor)
    return figure


def draw_probe(axis, probe_dice: Mapping[int, float], probe_floor: Optional[float]) -> None:
    twin = axis.twinx()
    epochs = sorted(probe_dice)
    twin.plot(epochs, [probe_dice[e] for e in epochs], "o-", color="tab:green", label="probe Dice", linewidth=2)
    if probe_floor is not None:
        twin.axhline(probe_floor, color="tab:green", linestyle="--", label="probe Dice, random encoder")
    twin.set_ylim(0, 1)
    twin.set_ylabel("probe Dice (held-out)")
    twin.legend(loc="upper center")


def save_progress_png(logged: Dict[str, List], output_folder: str, probe_dice: Optional[Mapping[int, float]] = None,
                      probe_floor: Optional[float] = None) -> None:
    import matplotlib.pyplot as plt

    figure = progress_figure(logged, probe_dice, probe_floor)
    figure.savefig(join(output_folder, "progress.png"), dpi=80)
    plt.close(figure)
