"""The book's `plot_values`: train vs. validation against epochs, with a second x-axis of
examples (or tokens) seen. Saved as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


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
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    return paths
