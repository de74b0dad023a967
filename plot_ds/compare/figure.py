"""compare.png: one bar chart per metric (mean over seeds, error bars one standard deviation, the
starting model as a dashed line), and the training curves of every run overlaid."""

from __future__ import annotations

from pathlib import Path

CURVES = ("loss/total", "logps/chosen")


def draw(summary: dict, results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    from .stats import shown_metrics

    metrics = shown_metrics(summary)
    panels = len(metrics) + len(CURVES)
    columns = 4
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    names = list(summary["variants"])
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for ax, metric in zip(axes, metrics):
        cells = [summary["variants"][n]["metrics"][metric.name] for n in names]
        means = [c["mean"] if c["mean"] is not None else 0.0 for c in cells]
        ax.bar(
            range(len(names)),
            means,
            yerr=[c["std"] or 0.0 for c in cells],
            capsize=3,
            color=[colours[n] for n in names],
        )
        start = summary["start"].get(metric.name)
        if start is not None:
            ax.axhline(start, color="black", linestyle="--", linewidth=1, label="start")
        ax.set_title(metric.label, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    for ax, curve in zip(axes[len(metrics) :], CURVES):
        for result in results:
            steps = [h["step"] for h in result.history if curve in h]
            ax.plot(
                steps,
                [h[curve] for h in result.history if curve in h],
                color=colours[result.variant],
                alpha=0.7,
                linewidth=1,
                label=result.variant,
            )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6)
        ax.set_title(f"training {curve}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
