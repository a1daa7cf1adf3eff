"""Downstream for Transformer-XL: `smoe slim` of a byte-level run (by expert count or by a
parameter budget), the word-level classifier on the slim model, `smoe finetune sst2` on it,
and hash routing moved to the word vocabulary."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from smoe.data.sst2 import read_split
from smoe.launcher.checkpoints.consolidate import consolidate, load_consolidated, save_consolidated
from smoe.launcher.cli import main
from smoe.launcher.config import build_config, parse_override
from smoe.launcher.downstream.slim import parameter_count
from smoe.launcher.downstream.tasks.txl_classifier import TransformerXLClassifier
from smoe.launcher.evaluation.metrics import model_size
from smoe.launcher.families.transformer_xl import build_model
from smoe.model import moe_layers_of, set_top_k, top_k_of
from smoe.model.slim import keep_experts, most_used
from smoe.routing.routers import HashRouter

from runs import SMALL, smoe

# SMALL: 2 layers, d_model 32, 4 experts of width 16, k 1 -> 4, mem_len + tgt_len = 32 bytes of context.
RUN = [*SMALL, "max_steps=4", "eval_ks=4", "eval_every=100", "save_every=100"]
CONTEXT = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in this process, as in the subprocesses (runs.CPU_ENV): on a busy
    2-core machine two threads make the in-process forwards many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def txl_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("txl") / "run"
    smoe("train", "--preset", "tiny", "--data-file", corpus, "--out", out, *RUN)
    return out


def sentences(sst2_dir, split="train") -> list[str]:
    return [line.split("\t")[0] for line in (sst2_dir / f"{split}.tsv").read_text().splitlines()[1:]]


def slim(capsys, run_dir, out, *args) -> str:
    """`smoe slim` in this process (no start-up cost); its output, or a failure with its error."""
    code = main(["slim", str(run_dir), "--out", str(out), *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def consolidated(run_dir, tmp_path, k):
    """The run's own model (every expert), at top-k ``k``."""
    config, model = load_consolidated(consolidate(run_dir, tmp_path / "run.safetensors"))
    set_top_k(model, k)
    return config, model


def test_slim_keeps_the_most_used_experts_and_budget_n_is_the_run(txl_run, sst2, tmp_path, capsys):
    data = ["--data", sst2 / "train.tsv", "--max-examples", "100"]
    slim(capsys, txl_run, tmp_path / "four", "--budget", "4", *data)
    output = slim(capsys, txl_run, tmp_path / "two", "--budget", "2", *data)
    assert "kept 2 of 4 experts per layer (counted at k=2)" in output
    config, run_model = consolidated(txl_run, tmp_path, k=2)

    # the counts are the experts the run's model picks for each byte of each sentence, at k = 2
    report = json.loads((tmp_path / "two" / "slim.json").read_text())
    expected = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        for text in sentences(sst2)[:100]:
            counts = run_model(torch.tensor([list(text.encode()[:CONTEXT])])).expert_counts
            expected += torch.stack(counts)
    assert report["counts"] == expected.tolist()
    assert (report["run_experts"], report["budget"], report["k"], report["method"]) == (4, 2, 2, "smoe-dropout")
    assert report["kept"] == [most_used(counts, 2) for counts in expected]

    # budget 2: the run's model with only the kept experts, saved with a config that says so
    slim_config, slim_model = load_consolidated(tmp_path / "two" / "model.safetensors")
    assert (slim_config.num_experts, slim_config.d_ff, moe_layers_of(slim_model)[0].top_k) == (2, 32, 2)
    for layer, keep in zip(run_model.layers, report["kept"]):
        layer.ffn = keep_experts(layer.ffn, keep)
    run_model.eval()  # the new layers too
    ids = torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(slim_model(ids).logits, run_model(ids).logits)

    # budget N: the run itself
    _, run_model = consolidated(txl_run, tmp_path, k=4)
    full_config, full_model = load_consolidated(tmp_path / "four" / "model.safetensors")
    assert (full_config.num_experts, full_config.d_ff, moe_layers_of(full_model)[0].top_k) == (4, 64, 4)
    torch.testing.assert_close(full_model(ids).logits, run_model(ids).logits)


def test_a_classifier_on_the_budget_n_model_is_one_on_the_run(txl_run, sst2, tmp_path, capsys):
    slim(capsys, txl_run, tmp_path / "four", "--budget", "4", "--data", sst2 / "train.tsv")
    run_dir = tmp_path / "run-model"
    consolidate(txl_run, run_dir / "model.safetensors")
    texts = sentences(sst2)
    classifiers = []
    for model_dir in (tmp_path / "four", run_dir):
        torch.manual_seed(0)
        classifier = TransformerXLClassifier.from_pretrained(model_dir, texts, num_labels=2, max_length=16)
        set_top_k(classifier, 4)
        classifiers.append(classifier.eval())
    assert "hash router" not in capsys.readouterr().out
    batch = [(text, 0) for text in sentences(sst2, "dev")[:8]]
    torch.testing.assert_close(classifiers[0].outputs(batch)[0], classifiers[1].outputs(batch)[0])

    classifier = classifiers[0]
    assert classifier.vocabulary[:2] == ["[PAD]", "[UNK]"] and classifier.default_lr == 1e-4
    assert set(classifier.vocabulary[2:]) == {word for text in texts for word in text.lower().split()}
    assert classifier.body.word_emb.weight.shape == (len(classifier.vocabulary), 32)
    assert "body.out_bias" not in classifier.state_dict()
    assert classifier.method == "smoe-dropout"


def test_the_classifier_reads_the_last_real_word_and_cuts_to_max_length(txl_run, sst2, tmp_path, capsys):
    slim(capsys, txl_run, tmp_path / "two", "--budget", "2", "--data", sst2 / "train.tsv")
    classifier = TransformerXLClassifier.from_pretrained(tmp_path / "two", sentences(sst2), 2, max_length=5).eval()
    short, long = ("the quick fox", 1), ("seven old wizards quietly brew potions over the dog", 0)
    ids, lengths = classifier.encode([short[0], long[0], "unheard-of words"])
    assert ids.shape == (3, 5) and lengths.tolist() == [3, 5, 2]
    assert ids[0, 3:].tolist() == [0, 0] and ids[2].tolist() == [1, 1, 0, 0, 0]  # [PAD] after, [UNK] for new words
    alone = classifier.outputs([short])[0]
    padded = classifier.outputs([short, long])[0][:1]
    torch.testing.assert_close(padded, alone)  # right padding never reaches the last real word
    assert classifier.labels([short, long]).tolist() == [1, 0]


def test_hash_routing_is_redrawn_for_the_word_vocabulary(tmp_path, capsys):
    config = build_config("tiny", dict(parse_override(o) for o in [*RUN, "method=hash"]))
    pretrained = build_model(config)
    save_consolidated(pretrained, config, tmp_path / "hash" / "model.safetensors")
    texts = ["The wizards brew", "seven old potions brew"]
    classifier = TransformerXLClassifier.from_pretrained(tmp_path / "hash", texts, num_labels=2, max_length=16)
    assert "note: the hash router's table maps the 256 pretraining token ids (bytes) to experts; it is redrawn " \
           "for the 8-word vocabulary" in capsys.readouterr().out
    for i, (layer, pretrained_layer) in enumerate(zip(moe_layers_of(classifier), moe_layers_of(pretrained))):
        assert pretrained_layer.router.table.shape == (256, 4)
        redrawn = HashRouter(4, layer.top_k, vocab_size=8, seed=config.seed + 101 * i).table
        assert torch.equal(layer.router.table, redrawn)
        torch.testing.assert_close(layer.local_experts[1].fc1.weight, pretrained_layer.local_experts[1].fc1.weight)
    torch.testing.assert_close(classifier.body.layers[1].attn.qkv_net.weight, pretrained.layers[1].attn.qkv_net.weight)
    word = classifier.word_ids["wizards"]
    counts = classifier.body.hidden_states(torch.tensor([[word] * 3])).expert_counts
    assert [c.nonzero().flatten().tolist() for c in counts] == \
        [sorted(layer.router.table[word, :layer.top_k].tolist()) for layer in moe_layers_of(classifier)]


def test_finetune_sst2_on_a_slim_transformer_xl(txl_run, sst2, tmp_path, capsys):
    slim(capsys, txl_run, tmp_path / "slim", "--budget", "2", "--data", sst2 / "train.tsv")
    result = smoe("finetune", "sst2", "--model", tmp_path / "slim", "--data", sst2, "--out", tmp_path / "ft",
                  "--epochs", "3", "--lr", "3e-3", "--batch-size", "16", "--k", "1")
    report = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert (report["family"], report["method"], report["run_experts"], report["budget"], report["experts"],
            report["k"]) == ("transformer-xl", "smoe-dropout", 4, 2, 2, 1)
    assert report["dev"]["accuracy"] > 0.9, result.stdout[-2000:]
    # the saved classifier comes back as it was trained (at k = 1), whatever texts are passed
    saved = TransformerXLClassifier.from_pretrained(tmp_path / "ft" / "model", [], 2, max_length=128)
    assert top_k_of(saved) == 1
    assert saved.evaluate(read_split(sst2 / "dev.tsv"))["accuracy"] == report["dev"]["accuracy"]


def test_params_picks_the_largest_budget_that_fits(txl_run, sst2, tmp_path, capsys):
    data = ["--data", sst2 / "train.tsv", "--max-examples", "20"]
    sizes = {}
    for budget in (1, 3):
        slim(capsys, txl_run, tmp_path / f"b{budget}", "--budget", budget, *data)
        _, model = load_consolidated(tmp_path / f"b{budget}" / "model.safetensors")
        sizes[budget] = model_size(model)  # parameters and the frozen routers' weights
    output = slim(capsys, txl_run, tmp_path / "p", "--params", sizes[3], *data)
    assert f"--params {sizes[3]} -> budget 3 of 4 experts per layer: {sizes[3] / 1e6:.2f}M parameters" in output
    assert json.loads((tmp_path / "p" / "slim.json").read_text())["parameters"] == sizes[3]
    output = slim(capsys, txl_run, tmp_path / "p", "--params", f"{(sizes[3] - 1) / 1000}k", *data)
    assert "-> budget 2 of 4 experts per layer" in output

    code = main(["slim", str(txl_run), "--params", "1k", "--data", str(sst2 / "train.tsv"), "--out", str(tmp_path)])
    assert code == 2 and (f"--params 1k is too small: the slim model with one expert per layer has {sizes[1]:,} "
                          f"parameters ({sizes[1] / 1e6:.2f}M); ask for at least that") in capsys.readouterr().err


@pytest.mark.parametrize("text, count", [("600000", 600_000), ("600k", 600_000), ("1.5M", 1_500_000),
                                         ("2g", 2_000_000_000), (" 12K ", 12_000)])
def test_parameter_counts_take_suffixes(text, count):
    assert parameter_count(text) == count


@pytest.mark.parametrize("text", ["1.5X", "-3", "", "k", "1e6", "1,000"])
def test_a_malformed_parameter_count_says_how_to_write_one(text):
    with pytest.raises(ValueError, match=f"--params {text} is not a parameter count: write e.g. 600000, 600k or 1.5M"):
        parameter_count(text)


def test_params_works_for_bert_runs_too(tmp_path, capsys):
    from runs import WORDS

    from smoe.data.mlm import train_tokenizer
    from smoe.launcher.downstream.slim import budget_for_params
    from smoe.launcher.families.masked_lm import MaskedLMFamily
    from smoe.launcher.families.masked_lm import build_mlm_model

    train_tokenizer([" ".join(WORDS)] * 10, "bert", 200).save_pretrained(tmp_path / "tokenizer")
    config = build_config("bert-tiny", {"n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64, "num_experts": 4,
                                        "vocab_size": 200, "k_min": 1, "k_max": 4, "eval_ks": (4,)})
    family = MaskedLMFamily(config, tmp_path)
    sizes = {budget: model_size(build_mlm_model(replace(config, num_experts=budget, d_ff=16 * budget,
                                                        k_max=budget, eval_ks=()), family.tokenizer.pad_token_id))
             for budget in (1, 3)}
    assert budget_for_params(str(sizes[3] - 1), config, family) == 2
    assert budget_for_params(str(sizes[3]), config, family) == 3
    with pytest.raises(ValueError, match=f"has {sizes[1]:,} parameters"):
        budget_for_params(str(sizes[1] - 1), config, family)


def test_slim_refuses_bad_budgets_and_both_kinds_of_budget(txl_run, sst2, tmp_path, capsys):
    args = ["slim", str(txl_run), "--data", str(sst2 / "train.tsv"), "--out", str(tmp_path / "x")]
    for budget in ("0", "5"):
        assert main([*args, "--budget", budget]) == 2
        assert f"--budget {budget} must be between 1 and the run's 4 experts" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--budget", "2", "--params", "1M"])
    assert "argument --params: not allowed with argument --budget" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(args)
    assert "one of the arguments --budget --params is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_dense_run_gets_a_narrower_fresh_mlp_or_stays_whole(corpus, sst2, tmp_path, capsys):
    run_dir = tmp_path / "dense"
    smoe("train", "--preset", "tiny", "--method", "dense", "--data-file", corpus, "--out", run_dir, *RUN)
    output = slim(capsys, run_dir, tmp_path / "two", "--budget", "2", "--data", sst2 / "train.tsv")
    assert "note: the dense run has no experts to drop: budget 2/4 means a dense MLP of width 32, freshly " \
           "initialised" in output
    _, run_model = consolidated(run_dir, tmp_path, k=1)
    config, narrow = load_consolidated(tmp_path / "two" / "model.safetensors")
    fresh, trained = narrow.layers[0].ffn.mlp.fc1.weight, run_model.layers[0].ffn.mlp.fc1.weight
    assert config.d_ff == 32 and fresh.shape == (32, 32) and not torch.equal(fresh, trained[:32])
    assert json.loads((tmp_path / "two" / "slim.json").read_text())["dense_width"] == 32
    torch.testing.assert_close(narrow.layers[0].attn.qkv_net.weight, run_model.layers[0].attn.qkv_net.weight)
    torch.testing.assert_close(narrow.word_emb.weight, run_model.word_emb.weight)

    output = slim(capsys, run_dir, tmp_path / "four", "--budget", "4", "--data", sst2 / "train.tsv")
    assert "the full budget keeps it whole" in output
    _, whole = load_consolidated(tmp_path / "four" / "model.safetensors")
    ids = torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole(ids).logits, run_model(ids).logits)
