"""The Pareto card of a sliced model: test quality against cost (forward FLOPs per token, batch-1
latency) for every uniform k and every named slice of a ``slices.json`` (`smoe slice`), as a table and
a plot. The model cards of `smoe export` and `smoe report` draw it; only the test split is shown
(the slices were chosen on the validation split)."""

from __future__ import annotations

from pathlib import Path

from smoe.launcher.evaluation.sweep import k_label
from smoe.launcher.runtime.files import atomic_output


def points(table: dict) -> list[dict]:
    """Every uniform k and slice of ``table`` as one row (label, ks, test bits, GFLOPs, parameters, ms),
    cheapest first."""
    rows = [{"label": f"k={row['k']}", "uniform": True, **row} for row in table["uniform"]]
    rows += [{"label": entry["name"], "uniform": False, "k": entry["ks"], **entry} for entry in table["slices"]]
    return sorted(rows, key=lambda row: (row["flops_per_token"], row["label"]))


def markdown(table: dict) -> str:
    """The card's table: one line per uniform k and slice, with the unit and device it was measured in."""
    unit = table["unit"]
    lines = [f"| setting | k per MoE layer | test {unit} | GFLOPs/token | active params | batch 1: ms |",
             "|---|---|---|---|---|---|"]
    for row in points(table):
        latency = row.get("batch1_latency_ms")
        lines.append(f"| {row['label']} | {k_label(row['k'])} | {row['test_bits']:.4f} | "
                     f"{row['flops_per_token'] / 1e9:.4g} | {row['active_params']:,} | "
                     f"{'-' if latency is None else f'{latency:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot(tables: dict[str, dict], path: Path) -> None:
    """Test quality against GFLOPs per token and against batch-1 latency: a line through each model's
    uniform ks, its slices as labelled markers; one colour per model (``tables``: label -> slices.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for colour, (label, table) in enumerate(tables.items()):
        rows = points(table)
        for axis, cost, scale in ((axes[0], "flops_per_token", 1e9), (axes[1], "batch1_latency_ms", 1)):
            uniform = [row for row in rows if row["uniform"] and row.get(cost) is not None]
            axis.plot([row[cost] / scale for row in uniform], [row["test_bits"] for row in uniform], marker="o",
                      color=f"C{colour}", label=f"{label}: uniform k")
            sliced = [row for row in rows if not row["uniform"] and row.get(cost) is not None]
            axis.scatter([row[cost] / scale for row in sliced], [row["test_bits"] for row in sliced], marker="*",
                         s=120, color=f"C{colour}", label=f"{label}: slices")
            for row in sliced:
                axis.annotate(k_label(row["k"]), (row[cost] / scale, row["test_bits"]), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
    unit = next(iter(tables.values()))["unit"]
    device = next(iter(tables.values())).get("device", "?")
    for axis, xlabel in zip(axes, ("GFLOPs per token (forward)", f"batch-1 latency, ms ({device})")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"test {unit}")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)
