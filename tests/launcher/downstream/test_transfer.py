"""CSQA multiple choice, distillation into one expert, and `smoe report` over the runs."""

from __future__ import annotations

import json

import pytest
import torch

from runs import WORDS
from runs import smoe

FAST = ["--lr", "3e-3", "--batch-size", "16", "--epochs", "3"]


@pytest.fixture(scope="module")
def models(bert_slim):
    """The shared BERT run's full model (budget 4 of 4) and its single-expert student (budget 1)."""
    return {"b4": bert_slim(4), "b1": bert_slim(1)}


def write_csqa(path, size: int, seed: int) -> None:
    """Five choices of random words; the answer is the one that holds 'wizards', at a random place."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(size):
            choices = [" ".join(WORDS[j] for j in torch.randint(len(WORDS) - 3, (2,), generator=generator))
                       for _ in range(5)]
            answer = int(torch.randint(5, (1,), generator=generator))
            choices[answer] += " wizards"
            record = {"answerKey": "ABCDE"[answer], "id": str(i), "question": {
                "stem": "which one is it ?", "choices": [{"label": label, "text": text}
                                                          for label, text in zip("ABCDE", choices)]}}
            f.write(json.dumps(record) + "\n")


def test_csqa_learns_multiple_choice_and_refuses_bad_records(models, tmp_path):
    data = tmp_path / "csqa"
    data.mkdir()
    write_csqa(data / "train_rand_split.jsonl", 300, seed=0)
    write_csqa(data / "dev_rand_split.jsonl", 60, seed=1)
    result = smoe("finetune", "csqa", "--model", models["b4"], "--data", data, "--out", tmp_path / "ft", *FAST)
    report = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert (report["task"], report["metric"], report["run_experts"], report["budget"]) == ("csqa", "accuracy", 4, 4)
    assert report["dev"]["accuracy"] > 0.8, result.stdout[-2000:]  # chance is 0.2

    (data / "dev_rand_split.jsonl").write_text('{"answerKey": "F", "question": {"stem": "s", "choices": '
                                               + json.dumps([{"label": c, "text": c} for c in "ABCDE"]) + "}}\n")
    result = smoe("finetune", "csqa", "--model", models["b4"], "--data", data, "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "dev_rand_split.jsonl:1: answerKey 'F' is not one of CSQA's classes" in \
        result.stderr
    (data / "dev_rand_split.jsonl").write_text('{"id": "1"}\n')
    result = smoe("finetune", "csqa", "--model", models["b4"], "--data", data, "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "CSQA records need 'answerKey'" in result.stderr


def test_distillation_teaches_the_single_expert_student_from_soft_targets_alone(models, sst2, tmp_path):
    smoe("finetune", "sst2", "--model", models["b4"], "--data", sst2, "--out", tmp_path / "teacher", *FAST)
    teacher = json.loads((tmp_path / "teacher" / "result.json").read_text())
    # alpha 1: the labels are never seen, so only the teacher can teach the task
    result = smoe("distill", "--teacher", tmp_path / "teacher", "--student", models["b1"], "--data", sst2,
                  "--out", tmp_path / "student", "--alpha", "1", *FAST)
    student = json.loads((tmp_path / "student" / "result.json").read_text())
    assert (student["kind"], student["experts"], student["k"], student["budget"]) == ("distillation", 1, 1, 1)
    assert student["teacher_dev"] == teacher["dev"] and student["teacher_method"] == "smoe-dropout"
    assert student["dev"]["accuracy"] > 0.9, result.stdout[-2000:]
    assert student["active_params"] < teacher["active_params"]

    result = smoe("distill", "--teacher", models["b4"], "--student", models["b1"], "--data", sst2,
                  "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "holds no fine-tuned classifier" in result.stderr


def test_report_lays_out_the_papers_tables_and_figure(models, sst2, tmp_path):
    runs = tmp_path / "runs"
    for name, model, k in (("full-k1", "b4", 1), ("full-k4", "b4", 4), ("one", "b1", 1)):
        smoe("finetune", "sst2", "--model", models[model], "--data", sst2, "--out", runs / name, "--k", k,
             "--epochs", "1", "--max-train-examples", "32")
    results = {name: json.loads((runs / name / "result.json").read_text()) for name in ("full-k1", "full-k4", "one")}
    result = smoe("report", runs, "--out", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text in result.stdout
    transfer, by_k = text.split("### Table 2")[1], text.split("### Table A5")[1]
    percent = {name: f"{100 * r['dev']['accuracy']:.2f}" for name, r in results.items()}
    # Table 2 takes the full budget at k = N only; Table A5 has every k of the full budget
    assert f"| bert smoe-dropout | {percent['full-k4']} |" in transfer
    assert f"| bert smoe-dropout | {percent['full-k1']} | {percent['full-k4']} |" in by_k
    assert "(no runs)" in text.split("### Table 3")[1].split("###")[0]
    assert (tmp_path / "report" / "figure4.png").read_bytes()[:4] == b"\x89PNG"

    (runs / "broken").mkdir()
    (runs / "broken" / "result.json").write_text("{")
    result = smoe("report", runs, check=False)
    assert result.returncode == 2 and "broken/result.json is not a `smoe finetune`" in result.stderr
    result = smoe("report", tmp_path / "empty-nothing", check=False)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_seeds_share_a_cell_and_a_point_and_show_their_mean_spread_and_count():
    from smoe.launcher.downstream.report import budget_points, cell

    runs = [{"task": "sst2", "family": "bert", "method": "smoe-dropout", "experts": 4, "k": k, "active_params": n,
             "metric": "accuracy", "dev": {"accuracy": accuracy}}
            for accuracy, k, n in ((0.7, 4, 100), (0.8, 4, 100), (0.9, 4, 100), (0.5, 1, 60))]
    assert (cell(runs[:3]), cell(runs[:1]), cell([])) == ("80.00 ± 10.00 (n=3)", "70.00", "")
    assert budget_points(runs) == {"sst2": {"bert smoe-dropout": {100: [70.0, 80.0, 90.0]}}}  # k < B is no budget point
