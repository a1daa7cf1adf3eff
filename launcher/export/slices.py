"""The named slices of an exported model: `smoe slice`'s ``RUN/slices.json`` carried into the exported
directory, with the index of each MoE layer in the model, its Pareto card and the code that loads one.

A slice is one k per MoE layer. The remote-code exports take it at load time
(``from_pretrained(OUT, trust_remote_code=True, layer_top_k=ks)``) or later (``model.set_top_k(ks)``).
transformers' own MoE classes (Mixtral, Qwen3-MoE) have one ``num_experts_per_tok`` in their config, so a
slice is set after loading by a loop over the layers it names: every module of the layer with a
``top_k`` gets the layer's k (the router in transformers 5, the sparse block in 4.x).
"""

from __future__ import annotations

import json
from pathlib import Path

from smoe.launcher.checkpoints.run_dir import SLICES_FILE, RunDir
from smoe.launcher.evaluation import frontier
from smoe.launcher.runtime.files import write_atomic

FRONTIER_FILE = "frontier.png"


def run_slices(run_root: Path | None) -> dict | None:
    """A run's slices.json, or None (no run, or not sliced)."""
    path = None if run_root is None else RunDir(Path(run_root)).slices
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def settings(table: dict | None) -> list[list[int]]:
    """The per-layer ks of every slice (none without a table)."""
    return [entry["ks"] for entry in table["slices"]] if table else []


def write(table: dict, layers: list[int], directory: Path) -> None:
    """slices.json (with ``layers``, the model's layer index of each MoE layer) and its plot into ``directory``."""
    write_atomic(directory / SLICES_FILE, json.dumps({**table, "layers": layers}, indent=2))
    frontier.plot({"this model": table}, directory / FRONTIER_FILE)


def loading_code(name: str, table: dict, auto_class: str, native: bool, layers_path: str = "model.model.layers"
                 ) -> str:
    """The lines that load ``name`` at its first slice."""
    first = table["slices"][0]["name"]
    lines = ["import json", "", f"from transformers import {auto_class}", "",
             f'table = json.load(open("{name}/{SLICES_FILE}"))',
             f'ks = {{entry["name"]: entry["ks"] for entry in table["slices"]}}["{first}"]  # one k per MoE layer']
    if native:
        lines += [f'model = {auto_class}.from_pretrained("{name}")',
                  'for index, k in zip(table["layers"], ks):  # the MoE layers, in order',
                  f"    for module in {layers_path}[index].modules():",
                  '        if hasattr(module, "top_k"):',
                  "            module.top_k = k"]
    else:
        lines += [f'model = {auto_class}.from_pretrained("{name}", trust_remote_code=True, layer_top_k=ks)',
                  "model.set_top_k(ks)  # or later, at any time (one k for every layer: model.set_top_k(4))"]
    return "```python\n" + "\n".join(lines) + "\n```\n"


def card_section(name: str, table: dict, auto_class: str, native: bool) -> str:
    """The card's slices: how to load one, and the Pareto table and plot (test split)."""
    return "\n".join([
        "## Slices: one k per layer, searched under budgets\n",
        f"`smoe slice` searched per-layer ks for the best quality under each budget on the validation split "
        f"({table['calibration']['max_batches'] or 'all'} batches; `{SLICES_FILE}`: each slice's ks, budget, "
        "quality, FLOPs, active parameters and batch-1 latency). Load one:\n",
        loading_code(name, table, auto_class, native),
        f"Test split, uniform k and slices (latency: one batch-1 forward on {table.get('device', '?')}, "
        f"measured by `smoe slice`):\n",
        frontier.markdown(table),
        f"![quality against cost]({FRONTIER_FILE})\n",
    ])
