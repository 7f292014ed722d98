"""progress_semi.png: the semi-supervised curves beside nnU-Net's progress.png."""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402


def isolated_style(plot_function):
    """Draw with matplotlib's default style: nnU-Net's progress plot changes the global style (seaborn, font x2.5)
    in the same process."""

    @functools.wraps(plot_function)
    def wrapped(*args, **kwargs):
        with plt.style.context("default"):
            return plot_function(*args, **kwargs)

    return wrapped


@isolated_style
def plot_semi_progress(logged: dict[str, list], keys: list[str], epoch: int, filename: str) -> None:
    """Plot loss terms (top), pseudo-label statistics and the unsupervised weight (bottom) for epochs 0..epoch.

    Args:
        logged: nnU-Net's local-logger dict (key -> one value per epoch).
        keys: the semi-supervised keys to plot (``semi_loss_*`` go to the top panel).
        epoch: last epoch to plot.
        filename: output PNG.
    """
    x = list(range(epoch + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 10), sharex=True)
    for key in keys:
        values = logged[key][: epoch + 1]
        if len(values) != len(x):
            continue
        axis = top if key.startswith("semi_loss_") else bottom
        axis.plot(x, values, label=key.removeprefix("semi_"), linewidth=2)
    if "mean_fg_dice" in logged and len(logged["mean_fg_dice"]) >= len(x):
        bottom.plot(x, logged["mean_fg_dice"][: epoch + 1], label="student_dice", linestyle="dotted", linewidth=2)
    top.set_ylabel("loss terms")
    bottom.set_ylabel("statistics / weight")
    bottom.set_xlabel("epoch")
    for axis in (top, bottom):
        axis.legend(loc="best")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
