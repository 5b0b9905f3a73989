"""Training curves as PNG files, when matplotlib (the `plot` extra) is installed."""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "(no plot: install matplotlib with pip install 'tinygrad_llm[plot]')"


def _pyplot():
    """matplotlib.pyplot drawing to files, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    """Whether plots can be drawn (matplotlib is installed)."""
    return _pyplot() is not None


def plot_curves(path, x_label: str, panels: dict) -> bool:
    """One panel per entry of ``panels`` ({y label: {series name: (xs, ys)}}), saved to
    ``path``. Returns False (and draws nothing) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (y_label, series) in zip(axes[0], panels.items(), strict=True):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
        ax.set(xlabel=x_label, ylabel=y_label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
    return True


def plot_metrics(records: list, path) -> bool:
    """The curves of a run's evaluations (metrics.jsonl records) against step: a loss panel
    (train and validation) and, when the records have them, an accuracy panel."""
    if not records:
        return False
    steps = [r["step"] for r in records]
    panels = {}
    for metric, label in (("loss", "cross-entropy loss (nats per token)"),
                          ("accuracy", "accuracy")):
        series = {split: (steps, [r[f"{split}_{metric}"] for r in records])
                  for split in ("train", "val") if f"{split}_{metric}" in records[0]}
        if series:
            panels[label] = series
    return bool(panels) and plot_curves(path, "step", panels)
