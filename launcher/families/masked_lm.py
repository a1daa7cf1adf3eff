"""BERT and RoBERTa masked-LM (``model=bert`` / ``model=roberta``): text -> tokenizer ->
blocks -> masked batches (:mod:`~smoe.launcher.families.text`), the transformers model with our
feed-forward blocks, and evaluation in bits per masked token at every k (the paper's "BPC" for BERT).

    smoe train --preset bert-tiny --data-files ../shared/data/books --out runs/bert-tiny
    smoe train --preset roberta-paper --tokenizer path/to/roberta-base --data-files books/ --out runs/roberta
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from smoe.launcher.config import TrainConfig
from smoe.launcher.families.text import TextFamily, seeded_cpu_rng
from smoe.model.bert import MODELS
from smoe.model.encoder import aux_loss, expert_counts
from smoe.model.parallel import init_expert_parallel


def build_mlm_model(config: TrainConfig, pad_token_id: int, rank: int = 0):
    """BERT or RoBERTa masked-LM with our blocks, from the flat run config."""
    config_class, model_class = MODELS[config.model]
    # RoBERTa numbers positions from padding_idx + 1.
    positions = config.max_positions + (pad_token_id + 1 if config.model == "roberta" else 0)
    hf_config = config_class(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=config.d_ff, max_position_embeddings=positions,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropatt, pad_token_id=pad_token_id,
        type_vocab_size=1 if config.model == "roberta" else 2,
        method=config.method, num_experts=config.num_experts, top_k=config.k_schedule()(0),
        moe_layers=config.moe_layers, ep_size=config.ep_size, router_options=asdict(config.router),
        dropblock_size=config.dropblock_size, dispatch=config.dispatch,
        router_seed=config.seed, combine_scale=float(config.combine_scale))
    with seeded_cpu_rng(config.seed):  # transformers draws the shared weights from the global RNG: same on every rank
        return model_class(hf_config, ep_rank=init_expert_parallel(config.ep_size), rank=rank)




class MaskedLMFamily(TextFamily):
    """A BERT/RoBERTa run: the text family with transformers' model and our feed-forward blocks."""

    def build(self, config: TrainConfig | None = None, rank: int = 0) -> nn.Module:
        return build_mlm_model(config or self.config, self.pad_token_id, rank)

    aux_loss = staticmethod(aux_loss)
    layer_counts = staticmethod(expert_counts)
