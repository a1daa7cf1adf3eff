"""The tables of docs/slicing.md from the runs of scripts/slicing-study.sh.

    python scripts/slicing_study.py args RUN      # smoe slice's arguments: the GFLOPs of uniform k = 2, 4, 8, every k
    python scripts/slicing_study.py summary OUT   # markdown: uniform k vs slices at equal FLOPs, by model and method
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BUDGET_KS = (2, 4, 8)


def slice_arguments(run: Path) -> str:
    """Budgets at the FLOPs of uniform k = 2, 4, 8 (so that a slice and a uniform k cost the same), and as a
    layer's steps every k up to 8, then every 4th (so that the walk can spread a uniform k's experts unevenly;
    the test split is read at every step, so fewer above the largest budget)."""
    rows = {row["k"]: row for row in json.loads((run / "eval.json").read_text())["rows"]}
    experts = json.loads((run / "config.json").read_text())["num_experts"]
    budgets = " ".join(f"{rows[k]['flops_per_token'] / 1e9:.12g}" for k in BUDGET_KS if k in rows)
    steps = [k for k in range(1, experts + 1) if k <= max(BUDGET_KS) or k % 4 == 0]
    return f"--budget-gflops {budgets} --ks {','.join(map(str, steps))}"


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def signed(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.4f}" if values else "-"
    return f"{statistics.fmean(values):+.4f} ± {statistics.stdev(values):.4f}"


def method_label(directory: str) -> str:
    return "per-layer random k" if "k_sampling=per-layer" in directory else "global k schedule"


def summary(out: Path) -> str:
    sections = []
    for model in sorted(p for p in out.iterdir() if p.is_dir()):
        tables = {}
        for method in sorted(p for p in model.iterdir() if p.is_dir()):
            seeds = {seed.name: json.loads((seed / "slices.json").read_text())
                     for seed in sorted(method.glob("seed-*")) if (seed / "slices.json").is_file()}
            if seeds:
                tables[method_label(method.name)] = seeds
        if not tables:
            continue
        unit = next(iter(next(iter(tables.values())).values()))["unit"]
        ks = [row["k"] for row in next(iter(next(iter(tables.values())).values()))["uniform"]]
        lines = [f"### {model.name}: test {unit} by uniform k (mean ± sd over seeds)\n",
                 "| training | seeds | " + " | ".join(f"k={k}" for k in ks) + " |",
                 "|---|---|" + "---|" * len(ks)]
        for label, seeds in tables.items():
            by_k = {k: [next(r["test_bits"] for r in table["uniform"] if r["k"] == k) for table in seeds.values()]
                    for k in ks}
            lines.append(f"| {label} | {len(seeds)} | " + " | ".join(spread(by_k[k]) for k in ks) + " |")
        lines += ["", f"### {model.name}: searched slice vs uniform k at the same FLOPs (test {unit}; "
                      "difference = slice - uniform, paired by seed; better: seeds where the slice is lower)\n",
                  "| training | budget | slices chosen (ks per layer, by seed) | slice | uniform k | difference | "
                  "better |", "|---|---|---|---|---|---|---|"]
        for label, seeds in tables.items():
            for k in BUDGET_KS:
                pairs, chosen = [], []
                for table in seeds.values():
                    uniform = next((r for r in table["uniform"] if r["k"] == k), None)
                    entry = next((s for s in table["slices"] if uniform is not None
                                  and abs(s["budget"]["gflops"] * 1e9 - uniform["flops_per_token"]) < 1), None)
                    if entry is not None:
                        pairs.append((entry["test_bits"], uniform["test_bits"]))
                        chosen.append("/".join(map(str, entry["ks"])))
                if pairs:
                    differences = [s - u for s, u in pairs]
                    lines.append(f"| {label} | FLOPs of k={k} | {', '.join(chosen)} | "
                                 f"{spread([s for s, _ in pairs])} | {spread([u for _, u in pairs])} | "
                                 f"{signed(differences)} | {sum(d < 0 for d in differences)}/{len(pairs)} |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


if __name__ == "__main__":
    command, path = sys.argv[1], Path(sys.argv[2])
    print(slice_arguments(path) if command == "args" else summary(path))
