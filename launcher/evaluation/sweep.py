"""The self-slimmable claim as a table: for each k, validation and test bits per token, the
parameters a token touches and the FLOPs per token; and its plot, the paper's Figure 1
(bits against active parameters, one point per k)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from smoe.launcher.evaluation.metrics import LN2, active_parameters
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import atomic_output
from smoe.model.moe import moe_layers_of, set_top_k, top_ks_of


@dataclass
class SweepRow:
    k: int | list[int] | None  # one k for every MoE layer, or one per MoE layer (a slice); None for dense models
    valid_bpc: float
    test_bpc: float | None
    active_params: int
    flops_per_token: float


def sweep(model: nn.Module, ks: list[int], valid_loss, test_loss, flops) -> list[SweepRow]:
    """Evaluate at every k (one row for a dense model) and restore the model's ks after. A k is one
    for every MoE layer, or a list with one per MoE layer.

    ``valid_loss()`` and ``test_loss()`` (or None) give nats per token, ``flops()`` forward
    FLOPs per token, each at the k currently set."""
    layers = moe_layers_of(model)
    original_ks = top_ks_of(model)
    rows = []
    for k in (ks if layers else [None]):
        if k is not None:
            k = k if isinstance(k, int) else list(k)
            set_top_k(model, k)
        rows.append(SweepRow(k, valid_loss() / LN2, test_loss() / LN2 if test_loss else None,
                             active_parameters(model, k), flops()))
        log.info(format_row(rows[-1]))
    if layers:
        set_top_k(model, original_ks)
    return rows


def k_label(k: int | list[int] | None) -> str:
    """A k as the command line writes it: ``4``, a slice as ``2/4/4/8``, a dense model as ``-``."""
    return "-" if k is None else str(k) if isinstance(k, int) else "/".join(map(str, k))


def format_header(unit: str = "BPC") -> str:
    valid, test = ("valid BPC", "test BPC") if unit == "BPC" else ("valid", "test")  # other units: in the title
    return f"{'k':>4}  {valid:>9}  {test:>8}  {'valid ppl':>9}  {'active params':>13}  {'GFLOPs/token':>12}"


def perplexity(bits: float | None) -> float | None:
    """Perplexity per token from bits per token: 2 ** bits."""
    return None if bits is None else 2.0 ** bits


def format_row(row: SweepRow) -> str:
    k = k_label(row.k)
    test = "-" if row.test_bpc is None else f"{row.test_bpc:.4f}"
    return (f"{k:>4}  {row.valid_bpc:>9.4f}  {test:>8}  {perplexity(row.valid_bpc):>9.2f}  "
            f"{row.active_params / 1e6:>12.2f}M  {row.flops_per_token / 1e9:>12.4f}")


def rows_to_json(rows: list[SweepRow]) -> list[dict]:
    """Each row's fields, and the perplexities they give."""
    return [{**asdict(r), "valid_perplexity": perplexity(r.valid_bpc), "test_perplexity": perplexity(r.test_bpc)}
            for r in rows]


def plot(rows: list[SweepRow], path, title: str, unit: str = "BPC") -> None:
    """BPC (or bits per token) against active parameters, one point per k (the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r.active_params / 1e6 for r in rows]
    ax.plot(x, [r.valid_bpc for r in rows], "o-", label="valid")
    if all(r.test_bpc is not None for r in rows):
        ax.plot(x, [r.test_bpc for r in rows], "s--", label="test")
    for r, xi in zip(rows, x):
        if r.k is not None:
            ax.annotate(f"k={k_label(r.k)}", (xi, r.valid_bpc), textcoords="offset points", xytext=(3, 4), fontsize=8)
    ax.set_xlabel("active parameters (M)")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
