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
    """Plot the loss terms as returned (top), as weighted in the total (middle), and the pseudo-label statistics
    with the unsupervised weight (bottom) for epochs 0..epoch.

    Args:
        logged: nnU-Net's local-logger dict (key -> one value per epoch).
        keys: the semi-supervised keys to plot (``semi_loss_*`` on top, ``semi_weighted_*`` in the middle).
        epoch: last epoch to plot.
        filename: output PNG.
    """
    x = list(range(epoch + 1))
    fig, (raw, weighted, bottom) = plt.subplots(3, 1, figsize=(12, 14), sharex=True)
    for key in keys:
        values = logged[key][: epoch + 1]
        if len(values) != len(x):
            continue
        axis = raw if key.startswith("semi_loss_") else weighted if key.startswith("semi_weighted_") else bottom
        axis.plot(x, values, label=key.removeprefix("semi_").removeprefix("loss_").removeprefix("weighted_"),
                  linewidth=2)
    if "mean_fg_dice" in logged and len(logged["mean_fg_dice"]) >= len(x):
        bottom.plot(x, logged["mean_fg_dice"][: epoch + 1], label="student_dice", linestyle="dotted", linewidth=2)
    raw.set_ylabel("loss terms (as returned)")
    weighted.set_ylabel("loss terms (weighted, in the total)")
    bottom.set_ylabel("statistics / weight")
    bottom.set_xlabel("epoch")
    for axis in (raw, weighted, bottom):
        if axis.lines:
            axis.legend(loc="best")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
