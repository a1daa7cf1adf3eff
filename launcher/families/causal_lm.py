"""Causal LMs on text (``model=causal-lm``): a Hugging Face decoder LM (Llama, Mistral, Qwen2/3,
GPT-2), upcycled into SMoE layers by `smoe upcycle` or left dense, trained on packed blocks of its
own tokenizer's tokens; evaluation in bits per token (perplexity = 2 ** bits) at every k.

    smoe upcycle path/to/llama runs/llama-moe --num-experts 16
    smoe train --preset causal-lm --init runs/llama-moe --data-files ../shared/data/books --out runs/llama-sd
    smoe train --preset causal-lm --method dense --init path/to/llama --data-files books/ --out runs/llama-dense
    smoe train --preset llama-tiny --method dense --data-files books/ --out runs/llama-tiny   # from scratch

The run directory keeps the model's structure in ``model/`` (the Hugging Face ``config.json``, and
``upcycling.json`` for an MoE): built from it, the run no longer needs its ``--init`` directory
once started, and `smoe eval`, `smoe export` and a resume on any expert-parallel layout read it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from smoe.launcher.config import CONFIG_FILE, TrainConfig
from smoe.launcher.families.text import TextFamily, seeded_cpu_rng
from smoe.launcher.runtime.files import write_atomic
from smoe.model.decoder import UPCYCLING_FILE, UpcycledMLP, Upcycling, build_upcycled, load_upcycled_weights
from smoe.model.feedforward import get_method
from smoe.model.parallel import init_expert_parallel

MODEL_DIR = "model"  # in the run directory: the structure the run's model is built from


def scratch_config(config: TrainConfig):
    """A Llama of the run config's shape, for a run with no ``--init`` (the study's dense pretraining)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
                       num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                       num_key_value_heads=config.n_head, max_position_embeddings=config.max_positions,
                       attention_dropout=config.dropatt, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
                       pad_token_id=1)


class CausalLMFamily(TextFamily):
    """A decoder-LM run: the text family with the model of ``--init`` (or a Llama from scratch)."""

    def _structure(self, config: TrainConfig):
        """The Hugging Face config and the upcycling (None: dense) of the run's model."""
        from transformers import AutoConfig

        saved = None if self.run_root is None else self.run_root / MODEL_DIR
        source = saved if saved is not None and (saved / CONFIG_FILE).is_file() else (
            Path(config.init) if config.init else None)
        hf_config = AutoConfig.from_pretrained(source) if source else scratch_config(config)
        if get_method(config.method).dense:
            return hf_config, None
        if source is not None and (source / UPCYCLING_FILE).is_file():
            return hf_config, Upcycling.read(source)
        return hf_config, Upcycling(config.num_experts, config.method, config.moe_layers,
                                    float(config.combine_scale), config.seed)

    def build(self, config: TrainConfig | None = None, rank: int = 0) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = config or self.config
        hf_config, upcycling = self._structure(config)
        hf_config.use_cache = False  # training and evaluation read whole blocks
        with seeded_cpu_rng(config.seed):  # the shared weights: the same on every rank
            if upcycling is None:
                return AutoModelForCausalLM.from_config(hf_config)
            model = build_upcycled(hf_config, upcycling, config.dispatch, config.ep_size,
                                   init_expert_parallel(config.ep_size))
        return model

    def initialize(self, model: nn.Module) -> None:
        """A new run starts from its ``--init`` directory's weights."""
        if not self.config.init:
            return
        if get_method(self.config.method).dense:
            from transformers import AutoModelForCausalLM

            model.load_state_dict(AutoModelForCausalLM.from_pretrained(self.config.init).state_dict())
        else:
            load_upcycled_weights(model, Path(self.config.init))

    def save_with_run(self, run_root: Path) -> None:
        """The model's structure in ``model/`` (upcycling.json first: a rank that finds config.json
        finds both), and a tokenizer trained on the data."""
        super().save_with_run(run_root)
        directory = Path(run_root) / MODEL_DIR
        directory.mkdir(parents=True, exist_ok=True)
        hf_config, upcycling = self._structure(self.config)
        if upcycling is not None:
            upcycling.save(directory)
        write_atomic(directory / CONFIG_FILE, hf_config.to_json_string().encode())

    @staticmethod
    def aux_loss(model: nn.Module):
        return sum((m.aux_loss for m in model.modules() if isinstance(m, UpcycledMLP)), 0.0)

    @staticmethod
    def layer_counts(model: nn.Module) -> list:
        return [m.expert_counts for m in model.modules() if isinstance(m, UpcycledMLP)]
