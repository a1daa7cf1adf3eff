"""`smoe report DIR [DIR ...] --out OUT`: the paper's downstream tables from result files, and the
Pareto card of every sliced run.

Collects every ``result.json`` that `smoe finetune` and `smoe distill` wrote under the
given directories and lays them out as the paper does:

- Table 2, transfer: each task's dev metric at the full budget with all experts active
  (k = N), one row per pretrained model family and method;
- Table 3, distillation into one expert: the student's SST-2 accuracy by teacher;
- Table A5: SST-2 accuracy by active experts k at the full budget;
- Figure 4: dev metric against the parameters of the fine-tuned model (budget B,
  k = B), one line per method and a panel per task (``OUT/figure4.png``).

Several runs in one cell or point (seeds) are averaged, with their standard deviation and,
in a table, how many. Every ``slices.json`` that `smoe slice` wrote there (in a run or an export)
adds its test quality against FLOPs and batch-1 latency, uniform k and slices
(:mod:`smoe.launcher.evaluation.frontier`; ``OUT/frontier.png``). The tables are printed and written
to ``OUT/report.md``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from smoe.launcher.checkpoints.run_dir import SLICES_FILE
from smoe.launcher.evaluation import frontier
from smoe.launcher.export.slices import FRONTIER_FILE
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import atomic_output, write_atomic

TASK_ORDER = ("sst2", "csqa", "asdiv-a", "mawps", "svamp")


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", help="directories searched (recursively) for result.json")
    parser.add_argument("--out", help="write report.md and figure4.png here")


def check_roots(roots: list[Path]) -> None:
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory: pass directories holding `smoe finetune` runs or "
                                    "sliced runs")


def load_slices(roots: list[Path]) -> dict[str, dict]:
    """Every slices.json under ``roots``, by its directory (relative to its root's parent)."""
    tables = {}
    for root in roots:
        for path in sorted(root.rglob(SLICES_FILE)):
            try:
                table = json.loads(path.read_text())
                table["uniform"], table["slices"], table["unit"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path} is not a `smoe slice` table (or is damaged): run `smoe slice` again or "
                                 "move the file away")
            tables[str(path.parent.relative_to(root.parent))] = table
    return tables


def load_results(roots: list[Path]) -> list[dict]:
    results = []
    for root in roots:
        for path in sorted(root.rglob("result.json")):
            try:
                result = json.loads(path.read_text())
                result["dev"][result["metric"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path} is not a `smoe finetune` or `smoe distill` result (or is damaged): "
                                 "rerun that command or move the file away")
            results.append({**result, "path": str(path.parent)})
    return results


def score(result: dict) -> float:
    return 100 * result["dev"][result["metric"]]


def full_budget(result: dict) -> bool:
    """All the pretrained model's experts kept (or a dense model at full width): not slimmed below N."""
    return result.get("budget") in (None, result.get("run_experts"))


def cell(results: list[dict]) -> str:
    """The mean score of a cell's runs; with several (seeds), their standard deviation and count."""
    scores = [score(r) for r in results]
    if len(scores) < 2:
        return f"{scores[0]:.2f}" if scores else ""
    return f"{statistics.fmean(scores):.2f} ± {statistics.stdev(scores):.2f} (n={len(scores)})"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(no runs)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def model_label(result: dict) -> str:
    return f"{result['family']} {result['method']}"


def table_transfer(results: list[dict]) -> str:
    cells = defaultdict(list)
    for r in results:
        if r.get("kind") != "distillation" and full_budget(r) and r["k"] in (None, r["experts"]):
            cells[model_label(r), r["task"]].append(r)
    tasks = [t for t in TASK_ORDER if any(task == t for _, task in cells)]
    models = sorted({label for label, _ in cells})
    return markdown(["model", *tasks], [[label, *(cell(cells[label, t]) for t in tasks)] for label in models])


def table_by_k(results: list[dict]) -> str:
    cells = defaultdict(list)
    for r in results:
        if r["task"] == "sst2" and r.get("kind") != "distillation" and full_budget(r) and r["k"] is not None:
            cells[model_label(r), r["k"]].append(r)
    ks = sorted({k for _, k in cells})
    models = sorted({label for label, _ in cells})
    return markdown(["model", *(f"k={k}" for k in ks)], [[label, *(cell(cells[label, k]) for k in ks)]
                                                          for label in models])


def table_distillation(results: list[dict]) -> str:
    cells = defaultdict(list)
    for r in results:
        if r.get("kind") == "distillation":
            cells[f"{r['family']} {r['teacher_method']}"].append(r)
    rows = [[teacher, f"{statistics.fmean(100 * r['teacher_dev']['accuracy'] for r in runs):.2f}", cell(runs)]
            for teacher, runs in sorted(cells.items())]
    return markdown(["teacher", "teacher accuracy", "student accuracy (one expert)"], rows)


def budget_points(results: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """task -> model -> parameters -> metric % of each run (seed) at that budget, every kept expert active."""
    points = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        if r.get("kind") != "distillation" and r["k"] in (None, r["experts"]):
            points[r["task"]][model_label(r)][r["active_params"]].append(score(r))
    return points


def plot_budgets(points, path: Path, columns: int = 3) -> None:
    """One panel per task: the mean over seeds at each budget, with their standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if t in points]
    rows, columns = -(-len(tasks) // columns), min(columns, len(tasks))
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for label, by_params in sorted(points[task].items()):
            params = sorted(by_params)
            means = [statistics.fmean(by_params[n]) for n in params]
            spreads = [statistics.stdev(by_params[n]) if len(by_params[n]) > 1 else 0.0 for n in params]
            axis.errorbar([n / 1e6 for n in params], means, yerr=spreads, marker="o", capsize=3, label=label)
        axis.set_title(task)
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel("dev metric (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tasks):]:
        axis.set_visible(False)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)


def run(args) -> None:
    roots = [Path(p) for p in args.runs]
    check_roots(roots)
    results, slices = load_results(roots), load_slices(roots)
    if not results and not slices:
        raise ValueError(f"no result.json or {SLICES_FILE} under {', '.join(map(str, roots))}: run `smoe finetune` "
                         "or `smoe slice` into them first")
    sections = [("Table 2: transfer at the full budget, all experts active (dev metric, %)", table_transfer),
                ("Table 3: distillation into a single-expert student (SST-2 dev accuracy, %)", table_distillation),
                ("Table A5: SST-2 dev accuracy (%) by active experts k, full budget", table_by_k)] if results else []
    parts = [f"### {title}\n\n{make(results)}" for title, make in sections]
    parts += [f"### Slices of {label}: test quality against cost\n\n{frontier.markdown(table)}"
              for label, table in slices.items()]
    text = "\n\n".join(parts)
    log.info(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "report.md", text + "\n")
        written = [out / "report.md"]
        if results:
            plot_budgets(budget_points(results), out / "figure4.png")
            written.append(out / "figure4.png")
        if slices:
            frontier.plot(slices, out / FRONTIER_FILE)
            written.append(out / FRONTIER_FILE)
        log.info(f"\nwrote {' and '.join(map(str, written))} ({len(results)} runs, {len(slices)} sliced)")
