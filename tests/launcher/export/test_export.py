"""`smoe export`: every family (Transformer-XL, BERT, RoBERTa), router (random-frozen, learned, hash)
and head loads in a bare environment (torch, transformers and safetensors only) and gives smoe's
logits at every k; the card holds measured figures; `smoe bench infer` picks the best k that fits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from runs import SMALL, SMALL_MLM
from smoe.launcher.bench.infer import SLIMMING_FILE, best_setting, load_exported
from smoe.launcher.checkpoints.consolidate import consolidate, load_consolidated, save_consolidated
from smoe.launcher.cli import main
from smoe.launcher.config import TrainConfig, parse_override
from smoe.launcher.families import family_of
from smoe.model.bert import CLASSES
from smoe.model.moe import moe_layers_of, set_top_k

HERE = Path(__file__).parent
ROUTERS = {"random-frozen": "smoe-dropout", "learned": "smoe-learned", "hash": "hash"}
TOLERANCE = 1e-5
SPEED = ["--ks", "1,4", "--batch", "2", "--length", "8", "--repeats", "1"]


def config_of(overrides: list[str]) -> TrainConfig:
    return TrainConfig.from_dict(dict(parse_override(text) for text in overrides))


@torch.no_grad()
def txl_expected(config: TrainConfig, model) -> dict:
    """Logits of two segments (the second after the first's memory) at every k and a slice, as `smoe eval`
    runs it."""
    model.eval()
    model.mem_len = config.eval_mem_len
    ids = torch.randint(config.vocab_size, (2, 2, 12), generator=torch.Generator().manual_seed(1))

    def logits(k):
        set_top_k(model, k)
        first = model(ids[:, 0])
        return torch.cat([first.logits, model(ids[:, 1], first.mems).logits], dim=1)

    return {"inputs": {"input_ids": ids}, **at_every_k_and_a_slice(model, config.num_experts, logits)}


def at_every_k_and_a_slice(model, num_experts: int, logits) -> dict:
    """``logits(k)`` at every k, and at the slice of k = 1 and N in turn over the MoE layers."""
    ks = [(1, num_experts)[i % 2] for i in range(len(moe_layers_of(model)))]
    return {"logits": {k: logits(k) for k in range(1, num_experts + 1)}, "slice": {"ks": ks, "logits": logits(ks)}}


@torch.no_grad()
def encoder_expected(model, multiple_choice: bool = False) -> dict:
    model.eval()
    config = model.config
    shape = (2, 3, 10) if multiple_choice else (2, 10)
    ids = torch.randint(config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, ..., 6:] = 0  # padding in the last row
    def logits(k):
        set_top_k(model, k)
        return model(input_ids=ids, attention_mask=mask).logits

    return {"inputs": {"input_ids": ids, "attention_mask": mask},
            **at_every_k_and_a_slice(model, config.num_experts, logits)}


def export(source: Path, out: Path, *extra: str) -> Path:
    assert main(["export", str(source), str(out), *SPEED, *extra]) == 0
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory, layout_runs, bert_run, bert_slim):
    """Each case exported, with the logits smoe gives at every k: name -> case."""
    root = tmp_path_factory.mktemp("exports")
    cases = {}

    def add(name: str, source: Path, auto_class: str, expected: dict, segments: bool = False):
        out = export(source, root / name)
        torch.save(expected, root / f"{name}.pt")
        cases[name] = {"dir": str(out), "auto_class": auto_class, "expected": str(root / f"{name}.pt"),
                       "segments": segments}

    for router, method in ROUTERS.items():  # Transformer-XL: consolidated files of fresh models
        layers = "every-2" if router == "hash" else "all"  # experts in layer 1 only: layer 0 stays dense
        config = config_of([*SMALL, f"method={method}", f"moe_layers={layers}"])
        family = family_of(config)
        model = family.build(config)
        file = save_consolidated(model, config, root / f"txl-{router}.safetensors", **family.metadata())
        add(f"txl-{router}", file, "AutoModelForCausalLM", txl_expected(config, model), segments=True)
    run_file = consolidate(layout_runs / "ep2", root / "ep2.safetensors")  # smoe's own reading of the run
    config, model = load_consolidated(run_file)
    add("txl-run-ep2", layout_runs / "ep2", "AutoModelForCausalLM", txl_expected(config, model), segments=True)

    config, model = load_consolidated(consolidate(bert_run, root / "bert-run.safetensors"))
    add("bert-run", bert_run, "AutoModelForMaskedLM", encoder_expected(model))
    slim = CLASSES["bert"]["masked-lm"].from_pretrained(bert_slim(4))
    add("bert-slim", bert_slim(4), "AutoModelForMaskedLM", encoder_expected(slim))

    # BERT and RoBERTa, each router once per family, across the three heads: transformers directories.
    heads = {"bert": {"random-frozen": "masked-lm", "learned": "sequence-classification", "hash": "multiple-choice"},
             "roberta": {"random-frozen": "multiple-choice", "learned": "masked-lm", "hash": "sequence-classification"}}
    auto = {"masked-lm": "AutoModelForMaskedLM", "sequence-classification": "AutoModelForSequenceClassification",
            "multiple-choice": "AutoModelForMultipleChoice"}
    for family_name, by_router in heads.items():
        for router, head in by_router.items():
            config = config_of([*SMALL_MLM, "eval_ks=1,2,4", f"model={family_name}", f"method={ROUTERS[router]}"])
            mlm = family_of(config, metadata={"pad_token_id": "1"}).build(config)
            mlm.config.num_labels = 3
            torch.manual_seed(0)
            model = CLASSES[family_name][head](mlm.config)
            model.load_state_dict(mlm.state_dict(), strict=False)  # the body; the head is new
            directory = root / f"{family_name}-{router}-model"
            model.save_pretrained(directory)
            add(f"{family_name}-{router}", directory, auto[head],
                encoder_expected(model, multiple_choice=head == "multiple-choice"))
    (root / "cases.json").write_text(json.dumps(cases))
    return root


@pytest.fixture(scope="session")
def bare_results(exports, bare_python) -> dict:
    result = subprocess.run([str(bare_python), "-I", str(HERE / "bare_check.py"), str(exports / "cases.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_bare_environment_has_neither_smoe_nor_deepspeed(bare_results):
    assert bare_results["importable"] == {"smoe": False, "deepspeed": False, "datasets": False}


CASES = ["txl-random-frozen", "txl-learned", "txl-hash", "txl-run-ep2", "bert-run", "bert-slim", "bert-random-frozen",
         "bert-learned", "bert-hash", "roberta-random-frozen", "roberta-learned", "roberta-hash"]


@pytest.mark.parametrize("name", CASES)
def test_the_export_loads_at_any_k_and_matches_smoe_at_every_k(bare_results, name):
    case = bare_results["cases"][name]
    assert case["loaded_k"] == 1  # num_experts_per_tok given to from_pretrained
    assert max(case["differences"].values()) <= TOLERANCE, case["differences"]
    assert len(case["differences"]) == 4  # every k of the 4 experts
    assert case["slice_difference"] <= TOLERANCE  # one k per expert layer, given at load time
    assert "num_experts_per_tok=5 must be between 1" in case["refused"]
    if not name.endswith(("learned", "hash")):  # random-frozen: the projection stays fp32 under a bf16 load
        assert case["bf16_buffers"] == ["torch.float32"]


def test_the_card_holds_the_trained_model_and_measured_figures(exports):
    card = (exports / "txl-run-ep2" / "README.md").read_text()
    table = json.loads((exports / "txl-run-ep2" / SLIMMING_FILE).read_text())
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "AutoModelForCausalLM.from_pretrained" in card and "num_experts_per_tok" in card
    assert "| max_steps | 8 |" in card and "optimizer steps: 6" in card  # the ep2 run stopped at step 6
    assert [row["k"] for row in table["rows"]] == [1, 4]
    for row in table["rows"]:
        assert row["batch1_tokens_per_s"] > 0 and row["batch_tokens_per_s"] > 0 and row["batch"] == 2
        assert row["flops_per_token"] > 0 and row["active_params"] > 0
        assert f"| {row['k']} | " in card
    flops = [row["flops_per_token"] for row in table["rows"]]
    assert flops[0] < flops[1]  # the FLOPs follow k
    bert = json.loads((exports / "bert-run" / SLIMMING_FILE).read_text())
    quality = {row["k"]: row["valid"] for row in bert["rows"]}
    assert bert["unit"] == "bits/token" and quality[4] > 0 and quality[1] is None  # the run's eval.json: k=4 only
    assert (exports / "bert-run" / "tokenizer.json").is_file()


def test_the_best_setting_is_the_best_quality_of_those_that_fit():
    costs = {"k=1": 1.0, "k=2": 2.0, "k=4": 3.0, "k=8": 8.0, "small": 2.5}
    assert best_setting(costs, 4.5, {}) == "small"  # no quality: the last that fits
    assert best_setting({k: v for k, v in costs.items() if k != "small"}, 4.5, {}) == "k=4"  # the largest k
    assert best_setting(costs, 4.5, {"k=1": 2.0, "k=2": 1.5, "k=4": 1.6, "k=8": 1.0, "small": 1.55}) == "k=2"
    assert best_setting(costs, 4.5, {"k=1": 2.0, "k=2": 1.5, "k=4": 1.6, "k=8": 1.0, "small": 1.4}) == "small"
    with pytest.raises(ValueError, match="nothing fits the budget 0.5: the cheapest, k=1, costs 1"):
        best_setting(costs, 0.5, {})


def test_bench_infer_picks_the_best_k_under_a_flops_or_latency_budget(exports, tmp_path, capsys):
    model = exports / "txl-learned"
    rows = {row["k"]: row for row in json.loads((model / SLIMMING_FILE).read_text())["rows"]}
    budget = (rows[1]["flops_per_token"] + rows[4]["flops_per_token"]) / 2 / 1e9  # k=1 fits, k=4 does not
    args = ["bench", "infer", str(model), "--ks", "1,4", "--batch", "2", "--length", "8", "--repeats", "1"]
    assert main([*args, "--budget-gflops", str(budget), "--json", str(tmp_path / "flops.json")]) == 0
    choice = json.loads((tmp_path / "flops.json").read_text())["choice"]
    assert choice == {"setting": "k=1", "k": 1, "budget": budget, "cost": rows[1]["flops_per_token"] / 1e9,
                      "unit": "GFLOPs per token"}

    assert main([*args, "--budget-ms", "1e6", "--json", str(tmp_path / "ms.json")]) == 0
    report = json.loads((tmp_path / "ms.json").read_text())
    latency = {row["k"]: row["latency_ms"] for row in report["rows"] if row["batch"] == 1}
    assert report["choice"] == {"setting": "k=4", "k": 4, "budget": 1e6, "cost": latency[4], "unit": "ms at batch 1"}

    capsys.readouterr()
    assert main([*args, "--budget-ms", "1e-9"]) == 2
    assert "nothing fits the budget 1e-09" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_write_and_leaves_nothing_behind(exports, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    source = exports / "txl-hash.safetensors"
    assert main(["export", str(source), str(taken)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"

    config = config_of([*SMALL, "method=thor"])
    family = family_of(config)
    thor = save_consolidated(family.build(config), config, tmp_path / "thor.safetensors")
    assert main(["export", str(thor), str(tmp_path / "out")]) == 2
    assert "only random-frozen, learned, hash routers are exported" in capsys.readouterr().err
    assert main(["export", str(source), str(tmp_path / "out"), "--k", "9"]) == 2
    assert "num_experts_per_tok=9 must be between 1 and the model's num_experts (4)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "thor.safetensors"]  # no partial directory


def test_a_dense_model_exports_with_one_row_and_no_k(tmp_path):
    config = config_of([*SMALL, "method=dense-concrete"])
    family = family_of(config)
    file = save_consolidated(family.build(config), config, tmp_path / "dense.safetensors")
    out = export(file, tmp_path / "dense")
    exported = json.loads((out / "config.json").read_text())
    assert exported["expert_layers"] == [] and exported["architectures"] == ["SMoETransformerXLForCausalLM"]
    assert [row["k"] for row in json.loads((out / SLIMMING_FILE).read_text())["rows"]] == [None]
    model = load_exported(out)
    with pytest.raises(ValueError, match="this model is dense"):
        model.set_top_k(2)
