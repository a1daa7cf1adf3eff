import os
import shutil

# DeepSpeed picks its accelerator at import time; tests run on CPU ranks joined by gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from runs import BOOKS_VOCAB, MLM, WORDS, decoder_config, smoe, train

pytest_plugins = ["slurm_cluster"]  # the `slurm` fixture: a real one-node Slurm on localhost


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A 40 kB byte file with structure a model can learn: repeated words in random order."""
    generator = torch.Generator().manual_seed(0)
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"<page>", b"</page>\n"]
    picks = torch.randint(len(words), (7000,), generator=generator).tolist()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(b"".join(words[i] for i in picks)[:40_000])
    return path


@pytest.fixture(scope="session")
def books(tmp_path_factory):
    """Two text files of 600 random 5-12 word lines, with blank lines between some."""
    generator = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("books")
    for name in ("a.txt", "b.txt"):
        lines = []
        for i in range(600):
            length = int(torch.randint(5, 13, (1,), generator=generator))
            lines.append(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (length,), generator=generator)))
            if i % 7 == 0:
                lines.append("   ")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def llama_dirs(books, tmp_path_factory):
    """The causal-LM tests' tiny Llama (2 layers, random weights) with a tokenizer trained on `books`,
    dense and upcycled to 4 experts."""
    from transformers import AutoModelForCausalLM

    from smoe.data.mlm import train_tokenizer
    from smoe.model.decoder import Upcycling, save_upcycled, upcycle

    root = tmp_path_factory.mktemp("llama")
    lines = [line for file in sorted(books.glob("*.txt")) for line in file.read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer(lines, "causal-lm", BOOKS_VOCAB)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(decoder_config("llama", 2, vocab_size=BOOKS_VOCAB))
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    save_upcycled(upcycle(dense, 4), Upcycling(4), root / "upcycled")
    tokenizer.save_pretrained(root / "upcycled")
    return root


@pytest.fixture(scope="session")
def sst2(tmp_path_factory):
    """A synthetic SST-2 of words the `books` tokenizers know: 400 training and 100 dev
    sentences, label 1 iff 'wizards' is in them, 0 iff 'potions' is."""
    root = tmp_path_factory.mktemp("sst2")
    generator = torch.Generator().manual_seed(0)
    for split, size in (("train", 400), ("dev", 100)):
        rows = ["sentence\tlabel"]
        for i in range(size):
            words = [WORDS[j] for j in torch.randint(len(WORDS) - 3, (6,), generator=generator)]  # no wizards/potions
            words.insert(int(torch.randint(6, (1,), generator=generator)), "wizards" if i % 2 else "potions")
            rows.append(f"{' '.join(words)}\t{i % 2}")
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def layout_runs(corpus, tmp_path_factory):
    """The small deterministic model on two layouts: 2 expert-parallel ranks stopped at step 6
    (``ep2``), one process at step 6 (``ep1-at-6``) and continued to step 8 (``ep1``)."""
    root = tmp_path_factory.mktemp("layouts")
    train(root / "ep2", corpus, "ep_size=2", "--stop-at", "6", ranks=2)
    train(root / "ep1", corpus, "--stop-at", "6")
    shutil.copytree(root / "ep1", root / "ep1-at-6")
    train(root / "ep1", corpus, "--resume")
    return root


@pytest.fixture(scope="session")
def bert_run(books, tmp_path_factory):
    """One BERT-tiny run on `books`, trained once per test run; tests only read it."""
    out = tmp_path_factory.mktemp("bert") / "run"
    smoe("train", "--preset", "bert-tiny", "--data-files", books, "--out", out, *MLM)
    return out


@pytest.fixture(scope="session")
def bert_slim(bert_run, books):
    """``bert_slim(B)``: `smoe slim` of :func:`bert_run` to B experts per layer (counted on books/a.txt),
    made once per budget per test run; tests only read it."""
    made = {}

    def slim(budget: int):
        if budget not in made:
            made[budget] = bert_run.parent / f"slim-{budget}"
            smoe("slim", bert_run, "--budget", budget, "--data", books / "a.txt", "--out", made[budget])
        return made[budget]

    return slim
