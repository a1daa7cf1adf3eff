"""The one training config: a preset from ``presets.json``, then command-line overrides.

Every knob of a run is one ``key=value`` away on the command line, is saved as
``config.json`` in the run directory, and flows down to the model, data and loop. The
router's options are one nested object (:class:`~smoe.routing.RouterOptions`, keys
``router.balance_coef=...``) that travels whole to the router. Validation names the field
and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from smoe.data.mlm import check_block_fits
from smoe.model.feedforward import FeedForwardSpec, Method, combine_scale_value, get_method, moe_layers
from smoe.model.transformer_xl import TransformerXLConfig
from smoe.routing import RouterOptions, TopKSchedule
from smoe.routing.schedule import StepPlan

# Fields that fix the shapes of the saved tensors, or what the trained weights compute: a
# resume must not change them. (ep_size may change: the checkpoint is resharded.)
SHAPE_FIELDS = ("model", "n_layer", "d_model", "n_head", "d_head", "d_ff", "num_experts", "method", "moe_layers",
                "vocab_size", "combine_scale")


MODELS = ("transformer-xl", "bert", "roberta", "causal-lm")
MASKED_LM_MODELS = ("bert", "roberta")
# How each MoE layer's k is set every training step (TrainConfig.k_sampling).
K_SAMPLINGS = ("global", "per-layer")
# The best combine scale found per model (docs/quality.md, 3 seeds each): inverted dropout for
# Transformer-XL (better at every k), the paper's 1 for masked-LM (better at k <= 4, equal above).
# A causal LM takes the scale its upcycled directory records (upcycling's default: N).
DEFAULT_COMBINE_SCALE = {"transformer-xl": "N", "bert": "1", "roberta": "1", "causal-lm": "N"}
# Keys that were renamed: still read in saved configs, presets and overrides.
RENAMED = {"d_inner": "d_ff", "balance_coef": "router.balance_coef", "z_loss_coef": "router.z_loss_coef"}
# The nested option objects, by key.
SECTIONS = {"router": RouterOptions}
# Keys a resume writes (where the run's max_steps changed); never given on the command line.
WRITTEN_BY_RESUME = ("earlier_max_steps",)


@dataclass
class TrainConfig:
    preset: str = "paper"
    model: str = "transformer-xl"  # transformer-xl (bytes, BPC), bert / roberta (masked-LM) or causal-lm (bits per token)
    # causal-lm: the Hugging Face directory the run starts from (`smoe upcycle`'s output, or a dense
    # model for the dense baseline); empty: a Llama built from the fields below, trained from scratch
    init: str = ""
    # data: a directory with enwik8 (or enwik8.zip, downloaded when absent), or any raw file split 90/5/5
    data_dir: str = ""
    data_file: str = ""
    # text data (masked-LM and causal-LM): text files (or directories of *.txt), or a hub data set; blocks of block_size tokens
    data_files: tuple[str, ...] = ()
    dataset: str = ""
    tokenizer: str = ""  # a transformers tokenizer directory; empty: train one on the text, saved with the run
    block_size: int = 128
    max_positions: int = 512
    mlm_probability: float = 0.15
    cache_dir: str = ""  # datasets' cache (default: its own)
    text_encoding: str = "utf-8"
    # Transformer-XL
    vocab_size: int = 256  # one token per byte
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    d_head: int = 64
    d_ff: int = 8192  # the dense MLP width: num_experts experts of d_ff / num_experts
    dropout: float = 0.1
    dropatt: float = 0.0
    tgt_len: int = 512
    mem_len: int = 512
    eval_tgt_len: int = 128
    clamp_len: int = -1
    # feed-forward method (smoe.model.feedforward.METHODS)
    method: str = "smoe-dropout"
    moe_layers: str = "all"
    num_experts: int = 16
    k_min: int = 8  # increasing-k methods: k = linear(k_min -> k_max) over max_steps
    k_max: int = 16
    k_fixed: int = 2  # fixed-k methods (smoe-learned, thor)
    # increasing-k methods: "global" sets the schedule's k on every MoE layer; "per-layer" gives each MoE
    # layer its own k each step, drawn uniformly from k_min..schedule(step) (TopKSchedule.layer_ks)
    k_sampling: str = "global"
    router: RouterOptions = field(default_factory=RouterOptions)  # router.balance_coef=..., router.z_loss_coef=...
    consistency_coef: float = 2.0  # THOR's symmetric KL weight
    dropblock_size: int = 64
    ep_size: int = 1
    dispatch: str = "auto"
    # each chosen expert's weight times this: N (inverted dropout) or 1 (the paper's); empty: the
    # model's default (DEFAULT_COMBINE_SCALE). Saved as a number, so a slimmed run keeps its scale.
    combine_scale: str = ""
    # optimisation
    batch_size: int = 22  # global, over all data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step: batch_size = micro x grad_accum x ranks
    eval_batch_size: int = 10
    max_steps: int = 400_000
    # (step, max_steps until then) of each resume that changed max_steps: the k and lr schedules
    # stretch what was left of them onto the new steps (StepPlan). Written by --resume.
    earlier_max_steps: tuple[tuple[int, int], ...] = ()
    lr: float = 2.5e-4
    lr_min: float = 0.0  # the decay ends here
    lr_decay: str = "cosine"  # cosine or linear, after warmup_steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 0
    clip: float = 0.25
    seed: int = 1111
    # bookkeeping
    log_every: int = 200
    eval_every: int = 4000
    eval_segments: int = 0  # validation during training reads this many segments (0: the whole split)
    save_every: int = 4000
    keep_checkpoints: int = 2
    eval_ks: tuple[int, ...] = (1, 2, 4, 8, 16)  # the sweep printed at the end of training
    ds_config: str = ""  # a ds_configs/ name or a .json path; empty: the resumed run's own, else "cpu"
    overflow_patience: int = 20  # fp16: non-finite losses in a row survived (DeepSpeed skips their updates)

    def __post_init__(self):
        self.eval_ks = tuple(int(k) for k in self.eval_ks)
        self.data_files = tuple(str(f) for f in self.data_files)
        self.earlier_max_steps = self.step_plan().earlier  # as tuples; refused when it does not fit max_steps
        method = get_method(self.method)
        default = DEFAULT_COMBINE_SCALE.get(self.model, "N")  # an unknown model is refused below
        self.combine_scale = f"{combine_scale_value(self.combine_scale or default, self.num_experts):g}"
        for name, allowed in (("model", MODELS), ("lr_decay", ("cosine", "linear")), ("k_sampling", K_SAMPLINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} '{getattr(self, name)}' is unknown: use one of {', '.join(allowed)}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability ({self.mlm_probability}) must be between 0 and 1, e.g. 0.15")
        if self.text:
            check_block_fits(self.block_size, self.max_positions)
        if self.model == "causal-lm" and method.dense and self.method != "dense":
            raise ValueError(f"method {self.method} is not built for causal-lm (its MLPs are the model's own): use "
                             "method=dense for the dense baseline, or an expert method")
        if self.init and self.model != "causal-lm":
            raise ValueError(f"init= starts a causal-lm run from a Hugging Face directory; model {self.model} "
                             "is built from the config: drop init, or use model=causal-lm")
        positive = ("n_layer", "d_model", "n_head", "d_head", "d_ff", "tgt_len", "eval_tgt_len", "num_experts",
                    "batch_size", "grad_accum", "eval_batch_size", "block_size", "max_positions", "max_steps", "log_every",
                    "eval_every", "save_every", "keep_checkpoints", "ep_size", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")
        for name in ("lr", "clip", "weight_decay", "mem_len", "eval_segments", "warmup_steps", "lr_min",
                     "consistency_coef", "overflow_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must not be negative")
        if not method.dense:
            if self.num_experts % self.ep_size:
                raise ValueError(f"ep_size ({self.ep_size}) does not divide num_experts ({self.num_experts}): "
                                 f"use an ep_size that divides {self.num_experts}")
            moe_layers(self.moe_layers, self.n_layer)
            self.k_schedule().check_experts(self.num_experts)
            bad = [k for k in self.eval_ks if not 1 <= k <= self.num_experts]
            if bad:
                raise ValueError(f"eval_ks {bad} outside 1..num_experts ({self.num_experts}): "
                                 f"use e.g. eval_ks=1,2,4,{self.num_experts}")
        if self.k_sampling == "per-layer":
            self._check_per_layer_k(method)
        self.model_config()

    def _check_per_layer_k(self, method: Method) -> None:
        """Per-layer k draws from the increasing-k schedule's range: refused where there is no range."""
        if method.dense or not method.increasing_k:
            has = "no experts" if method.dense else f"one fixed k (k_fixed={self.k_fixed})"
            raise ValueError(f"k_sampling=per-layer draws each MoE layer's k from the k_min -> k_max schedule, and "
                             f"method {self.method} has {has}: use k_sampling=global, or an increasing-k method "
                             "such as smoe-dropout")
        if self.k_min == self.k_max:
            raise ValueError(f"k_sampling=per-layer with k_min == k_max ({self.k_max}) gives every layer k "
                             f"{self.k_max}: lower k_min, or use k_sampling=global")

    @property
    def text(self) -> bool:
        """Trained on text through a tokenizer (masked-LM and causal-LM), not on bytes."""
        return self.model != "transformer-xl"

    @property
    def masked_lm(self) -> bool:
        return self.model in MASKED_LM_MODELS

    @property
    def eval_mem_len(self) -> int:
        """Evaluation memory: Transformer-XL's eval keeps the training context (mem_len + tgt_len)
        when it reads shorter segments."""
        return self.mem_len + max(self.tgt_len - self.eval_tgt_len, 0)

    def step_plan(self) -> StepPlan:
        """Steps trained -> steps of the plan the k and lr schedules were made for."""
        return StepPlan(self.max_steps, self.earlier_max_steps)

    def k_schedule(self) -> TopKSchedule:
        """k by optimizer step for this method (dense methods: a constant 1, unused)."""
        method = get_method(self.method)
        if method.dense:
            return TopKSchedule.constant(1)
        if method.increasing_k:
            return TopKSchedule.linear(self.k_min, self.k_max, self.max_steps, self.earlier_max_steps)
        return TopKSchedule.constant(self.k_fixed)

    def model_config(self) -> TransformerXLConfig:
        return TransformerXLConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, d_model=self.d_model,
                                   n_head=self.n_head, d_head=self.d_head, d_ff=self.d_ff,
                                   dropout=self.dropout, dropatt=self.dropatt, tgt_len=self.tgt_len,
                                   mem_len=self.mem_len, clamp_len=self.clamp_len, seed=self.seed)

    def feedforward_spec(self) -> FeedForwardSpec:
        return FeedForwardSpec(self.method, self.d_model, self.d_ff, self.n_layer, self.moe_layers,
                               self.num_experts, self.k_schedule()(0), dropout=self.dropout,
                               router_options=self.router,
                               dropblock_size=self.dropblock_size, vocab_size=self.vocab_size,
                               ep_size=self.ep_size, dispatch=self.dispatch, seed=self.seed,
                               combine_scale=float(self.combine_scale))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["eval_ks"] = list(self.eval_ks)
        values["data_files"] = list(self.data_files)
        values["earlier_max_steps"] = [list(change) for change in self.earlier_max_steps]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """From flat keys, dotted keys (``router.balance_coef``), nested dicts or option objects,
        and renamed keys (:data:`RENAMED`); a later dotted key wins over its section's dict."""
        flat, sections = {}, {name: {} for name in SECTIONS}
        for key, value in values.items():
            key = canonical_key(key)
            if key in SECTIONS:
                given = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
                _check_keys([f"{key}.{name}" for name in given])
                sections[key].update(given)
                continue
            _check_keys([key])
            if "." in key:
                section, name = key.split(".", 1)
                sections[section][name] = value
            else:
                flat[key] = value
        return cls(**flat, **{name: SECTIONS[name](**options) for name, options in sections.items()})

    @classmethod
    def from_saved(cls, values: dict) -> "TrainConfig":
        """A run's saved config. Runs saved before ``combine_scale`` existed were trained with 1."""
        return cls.from_dict({"combine_scale": "1", **values})


def parse_ks(text: str, flag: str = "--k") -> list[int]:
    """``1,2,4,16`` as integers; anything else is refused with the expected form."""
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated integers, e.g. {flag} 1,2,4,16") from None


def parse_k_settings(text: str, flag: str = "--k", slices: dict[str, list[int]] | None = None
                     ) -> list[int | tuple[int, ...]]:
    """``1,2,4,2/4/4/8``: ks for every MoE layer, or a slice with one k per MoE layer joined by ``/``,
    or a slice's name from ``slices`` (a run's ``slices.json``, written by `smoe slice`)."""
    settings = []
    for item in text.split(","):
        if slices and item in slices:
            settings.append(tuple(slices[item]))
            continue
        try:
            settings.append(int(item) if "/" not in item else tuple(int(k) for k in item.split("/")))
        except ValueError:
            known = ", ".join(slices) if slices else "none yet: `smoe slice RUN` names them"
            raise ValueError(f"{flag} {text}: expected comma-separated ks, each an integer, one per MoE layer joined "
                             f"by '/' (e.g. {flag} 1,2,4,2/4/4/8) or the name of a slice of the run: '{item}' is "
                             f"none of them (the run's slices: {known})") from None
    return settings


def check_k_settings(settings: list, config: "TrainConfig", given: str) -> None:
    """Every k within 1..num_experts, and every slice with one k per MoE layer of the run; ``given`` is
    what the command line said (``--k 1,99``), for the message."""
    layers = len(moe_layers(config.moe_layers, config.n_layer))
    for setting in settings:
        ks = [setting] if isinstance(setting, int) else list(setting)
        if any(not 1 <= k <= config.num_experts for k in ks):
            raise ValueError(f"{given}: every k must be between 1 and num_experts ({config.num_experts})")
        if not isinstance(setting, int) and len(ks) != layers:
            raise ValueError(f"{given}: the slice {'/'.join(map(str, ks))} has {len(ks)} per-layer ks for a run with "
                             f"{layers} MoE layers: give one k per MoE layer")


def presets() -> dict[str, dict]:
    return json.loads((files("smoe") / "launcher" / "presets.json").read_text())


def preset_values(name: str) -> dict:
    """A preset's values, following ``"base"`` links (``paper-8l`` is ``paper`` with 8 layers)."""
    table = presets()
    if name not in table:
        raise ValueError(f"preset '{name}' is unknown: use one of {', '.join(table)}")
    values = dict(table[name])
    base = values.pop("base", None)
    values = {**(preset_values(base) if base else {}), **values}
    values.pop("description", None)
    return {**values, "preset": name}


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value converted to the field's type."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not key=value, e.g. max_steps=1000")
    key, raw = text.split("=", 1)
    key = canonical_key(key)
    _check_keys([key])
    if key in WRITTEN_BY_RESUME:
        raise ValueError(f"{key} is kept by smoe (where a resume changed max_steps), not set by hand: "
                         "to move the run's end, pass max_steps=N")
    kind = key_types()[key]
    try:
        if kind == "int":
            return key, int(raw)
        if kind == "float":
            return key, float(raw)
        if kind == "tuple[int, ...]":
            return key, tuple(int(v) for v in raw.split(",") if v)
        if kind == "tuple[str, ...]":
            return key, tuple(v for v in raw.split(",") if v)
        return key, raw
    except ValueError:
        raise ValueError(f"override {key}={raw}: expected {kind.split('[')[0]}, got '{raw}'") from None


def build_config(preset: str, overrides: dict | None = None) -> TrainConfig:
    """The preset, then what an ``init`` directory fixes (causal-LM: shape, experts, tokenizer), then the
    overrides."""
    overrides = dict(overrides or {})
    values = preset_values(preset)
    if overrides.get("init"):
        if values.get("model") != "causal-lm":
            raise ValueError(f"--init starts a causal-lm run: preset {preset} trains another model; use --preset "
                             "causal-lm (the default with --init)")
        fields = init_fields(overrides["init"])
        check_init_method(fields, overrides.get("method", fields["method"]))
        fixed = [key for key in fields if key not in ("method", "k_max", "eval_ks", "tokenizer", "init")
                 and key in overrides and overrides[key] != fields[key]]
        if fixed:
            raise ValueError(f"{fixed[0]}={overrides[fixed[0]]}: the --init directory fixes it ({fields[fixed[0]]}); "
                             "drop the override, or upcycle (or save) a model of that shape")
        if "num_experts" in fields and "k_min" not in overrides:  # the preset's k_min, at most the directory's N
            fields["k_min"] = min(values.get("k_min", 1), fields["num_experts"])
        values.update(fields)
    return TrainConfig.from_dict({**values, **overrides})


CONFIG_FILE = "config.json"  # a Hugging Face directory's config


def init_fields(init: str) -> dict:
    """The run config's fields that an ``--init`` directory fixes: its shape, its experts (from
    ``upcycling.json``) and its tokenizer. A dense directory trains with ``method=dense``."""
    from transformers import AutoConfig

    from smoe.data.mlm import TOKENIZER_FILES
    from smoe.model.decoder import UPCYCLING_FILE, Upcycling, architecture_of

    directory = Path(init)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--init {init} holds no {CONFIG_FILE}: pass a directory written by `smoe upcycle` "
                                "(or by save_pretrained, for the dense baseline)")
    hf_config = AutoConfig.from_pretrained(directory)
    architecture_of(hf_config)  # refuses what cannot be upcycled or trained here
    d_model = hf_config.hidden_size
    fields = {"init": str(directory.resolve()), "n_layer": hf_config.num_hidden_layers, "d_model": d_model,
              "n_head": hf_config.num_attention_heads, "vocab_size": hf_config.vocab_size,
              "d_ff": getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None)
              or 4 * d_model, "max_positions": hf_config.max_position_embeddings}
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        fields["tokenizer"] = fields["init"]
    if (directory / UPCYCLING_FILE).is_file():
        upcycling = Upcycling.read(directory)
        n = upcycling.num_experts
        fields.update(method=upcycling.method, num_experts=n, moe_layers=upcycling.moe_layers,
                      combine_scale=f"{upcycling.combine_scale:g}", k_max=n,
                      eval_ks=tuple(sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k < n} | {n})))
    else:
        fields["method"] = "dense"
    return fields


def check_init_method(fields: dict, method: str) -> None:
    """An upcycled directory trains the method it was upcycled for; a dense one trains dense."""
    if method == fields["method"]:
        return
    if fields["method"] == "dense":
        raise ValueError(f"--init {fields['init']} is a dense model: train it with --method dense (the baseline), or "
                         f"upcycle it first with `smoe upcycle {fields['init']} OUT --num-experts N --method {method}`")
    raise ValueError(f"--init {fields['init']} was upcycled for method {fields['method']}, not {method}: drop "
                     f"--method, or upcycle the dense model again with --method {method}")



def canonical_key(key: str) -> str:
    """A key as the config names it: dashes as underscores, renamed keys under their new name."""
    key = key.strip().replace("-", "_")
    return RENAMED.get(key, key)


def key_types() -> dict[str, str]:
    """Every key a config takes (a section's as ``section.name``) and its type's name."""
    types = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            types.update({f"{f.name}.{g.name}": g.type for g in dataclasses.fields(SECTIONS[f.name])})
        else:
            types[f.name] = f.type
    return types


def _check_keys(keys) -> None:
    known = list(key_types())
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see `smoe train --help` for the keys"
            raise ValueError(f"config key '{key}' does not exist: {hint}")


def resumed_config(saved: TrainConfig, overrides: dict, preset: str | None = None) -> tuple[TrainConfig, list[str]]:
    """A resumed run's config: its saved one with only the ``overrides`` given changed, and one line
    per change (``max_steps: 20 -> 3000``). ``preset``: the one named on the command line, if any;
    another than the run's is refused (its values would silently replace the run's)."""
    if preset is not None and preset != saved.preset:
        raise ValueError(f"--preset {preset}: this run was started with preset {saved.preset}, and a resume "
                         "continues the run's own config.json: drop --preset, and give only the keys to change "
                         "as KEY=VALUE")
    config = TrainConfig.from_dict({**saved.to_dict(), **overrides})
    check_resume_compatible(saved, config)
    return config, config_changes(saved, config)


def config_changes(before: TrainConfig, after: TrainConfig) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a section's as ``section.name``)."""
    old, new = _flat_values(before), _flat_values(after)
    return [f"{key}: {_shown(old[key])} -> {_shown(new[key])}" for key in new if old[key] != new[key]]


def _flat_values(config: TrainConfig) -> dict:
    values = {}
    for key, value in config.to_dict().items():
        if key in SECTIONS:
            values.update({f"{key}.{name}": option for name, option in value.items()})
        else:
            values[key] = value
    return values


def _shown(value) -> str:
    """A value as it is written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_resume_compatible(saved: TrainConfig, current: TrainConfig) -> None:
    """Refuse a resume whose config would not fit the saved tensors."""
    changed = [f"{name}: saved {getattr(saved, name)!r}, now {getattr(current, name)!r}"
               for name in SHAPE_FIELDS if getattr(saved, name) != getattr(current, name)]
    if changed:
        raise ValueError("cannot resume: the config changes the model (" + "; ".join(changed) +
                         "). Resume with the saved values, or start a new run in another --out directory")
