"""Evaluation at any world size: the paper's eval batch of 10 streams on 4 ranks (uneven shares),
3 streams on 4 expert-parallel ranks (one rank with none), and masked-LM on 3 ranks, each giving
the BPC of one process. Real gloo ranks and a real DeepSpeed engine."""

from __future__ import annotations

import json

import pytest
import torch

from smoe.data import OrderedStream, load_corpus
from smoe.launcher.config import build_config, parse_override
from smoe.launcher.evaluation.metrics import evaluate
from smoe.launcher.families.transformer_xl import build_model
from smoe.launcher.runtime.distributed import spawn
from smoe.launcher.runtime.engine import build_engine, engine_config

from runs import SMALL

TINY = dict(parse_override(o) for o in SMALL)


def txl_config(corpus, **overrides):
    return build_config("tiny", {**TINY, "data_file": str(corpus), "dropout": 0.0, **overrides})


def _txl_bpc_on_ranks(rank, world, corpus, overrides, out):
    config = txl_config(corpus, **overrides)
    engine = build_engine(build_model(config, rank), engine_config(config, world, None, training=False))
    valid = load_corpus(data_file=config.data_file).valid
    stream = OrderedStream(valid, config.eval_batch_size, config.eval_tgt_len, rank, world, name="valid")
    loss = evaluate(engine.module, stream, config.eval_mem_len)
    if rank == 0:
        out.write_text(json.dumps(loss))


@pytest.mark.parametrize("eval_batch_size, ep_size", [(10, 1), (3, 2)])
def test_transformer_xl_evaluates_on_more_ranks_than_divide_the_batch(corpus, tmp_path, eval_batch_size, ep_size):
    overrides = {"eval_batch_size": eval_batch_size, "ep_size": ep_size}
    config = txl_config(corpus, eval_batch_size=eval_batch_size)  # experts are seeded by global id: same model
    valid = load_corpus(data_file=config.data_file).valid
    one_process = evaluate(build_model(config), OrderedStream(valid, eval_batch_size, config.eval_tgt_len),
                           config.eval_mem_len)
    out = tmp_path / "loss.json"
    spawn(_txl_bpc_on_ranks, 4, corpus, overrides, out)
    assert json.loads(out.read_text()) == pytest.approx(one_process, rel=1e-6)


def _mlm_loss_on_ranks(rank, world, config, out):
    from smoe.launcher.families.masked_lm import build_mlm_model
    from smoe.launcher.families.text import TextData

    data = TextData(config, out.parent)
    model = build_mlm_model(config, data.tokenizer.pad_token_id, rank).eval()
    loss = data.eval_loss(model, "valid", rank, world, torch.device("cpu"))
    if rank == 0:
        out.write_text(json.dumps(loss))


def test_masked_lm_evaluates_on_ranks_that_do_not_divide_the_batch(books, tmp_path):
    """Every rank masks the whole batch from the same seed: the masks, and so the loss, are
    those of one process (4 blocks per batch on 3 ranks: shares of 1, 1 and 2)."""
    from smoe.launcher.families.masked_lm import build_mlm_model
    from smoe.launcher.families.text import TextData

    config = build_config("bert-tiny", {"data_files": (str(books),), "n_layer": 2, "d_model": 32, "n_head": 2,
                                        "d_ff": 64, "num_experts": 4, "k_min": 1, "k_max": 4, "eval_ks": (1, 4),
                                        "vocab_size": 300, "block_size": 16, "max_positions": 32, "batch_size": 8,
                                        "eval_batch_size": 4, "dropout": 0.0})
    data = TextData(config, tmp_path)
    one_process = data.eval_loss(build_mlm_model(config, data.tokenizer.pad_token_id).eval(), "valid", 0, 1, "cpu")
    out = tmp_path / "loss.json"
    spawn(_mlm_loss_on_ranks, 3, config, out)
    assert json.loads(out.read_text()) == pytest.approx(one_process, rel=1e-6)


def test_masked_lm_seeds_only_the_cpu_generator(books, tmp_path, monkeypatch):
    """``torch.manual_seed`` also seeds every CUDA generator: on GPUs that gave all ranks the same
    dropout masks and reset the training stream at every validation. Building the model and
    evaluating must leave CUDA's generators alone (and restore the CPU one)."""
    from smoe.launcher.families.masked_lm import build_mlm_model
    from smoe.launcher.families.text import TextData

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    config = build_config("bert-tiny", {"data_files": (str(books),), "n_layer": 1, "d_model": 32, "n_head": 2,
                                        "d_ff": 64, "num_experts": 4, "k_min": 1, "k_max": 4, "eval_ks": (1, 4),
                                        "vocab_size": 300, "block_size": 16, "max_positions": 32, "batch_size": 8,
                                        "eval_batch_size": 4})
    data = TextData(config, tmp_path)
    cpu_state = torch.get_rng_state()
    model = build_mlm_model(config, data.tokenizer.pad_token_id)
    data.eval_loss(model, "valid", 0, 1, "cpu", max_batches=1)
    assert seeded == []
    assert torch.equal(torch.get_rng_state(), cpu_state)
