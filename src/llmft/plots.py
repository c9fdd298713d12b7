"""Plots of a run, saved as PNG and PDF (each written under a temporary name, then renamed):
the book's `plot_values` (train vs. validation against epochs, with a second x-axis of examples
or tokens seen), and scikit-learn's displays (a classifier's confusion matrix and curves)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from llmft.paths import replaced_atomically  # noqa: E402


def save_figure(fig, out_stem: Path) -> list[Path]:
    """`out_stem`.png and .pdf, each complete or absent; the figure is closed."""
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    try:
        for path in paths:
            with replaced_atomically(path) as tmp:
                fig.savefig(tmp, format=path.suffix[1:])
    finally:
        plt.close(fig)
    return paths


def plot_values(epochs_seen: list[float], seen: list[int], train_values: list[float],
                val_values: list[float], label: str, out_stem: Path, seen_label: str = "Examples seen") -> list[Path]:
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # a second x-axis, aligned by plotting invisibly against `seen`
    ax2.plot(seen, train_values, alpha=0)
    ax2.set_xlabel(seen_label)
    fig.tight_layout()
    return save_figure(fig, out_stem)


def plot_display(display, title: str, out_stem: Path, size: float = 4.5, **options) -> list[Path]:
    """A scikit-learn display (confusion matrix, ROC or precision-recall curve) as a figure;
    `options` go to its `plot`."""
    fig, ax = plt.subplots(figsize=(size, size))
    display.plot(ax=ax, **options)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out_stem)
