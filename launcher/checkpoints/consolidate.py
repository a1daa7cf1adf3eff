"""`smoe ckpt consolidate RUN OUT.safetensors`: one portable file from a run of any ep_size.

DeepSpeed's checkpoint is a directory: the shared weights in one file and each expert
in its own, named by global id. The consolidated file holds every tensor under its
ep_size 1 name (the names of a model built on one process), with the run's config as
JSON in the safetensors metadata, so it loads without DeepSpeed, ranks or the run directory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smoe.launcher.checkpoints import schema
from smoe.launcher.checkpoints.load import loadable_tag
from smoe.launcher.checkpoints.run_dir import RunDir
from smoe.launcher.config import TrainConfig
from smoe.launcher.families import family_of
from smoe.launcher.runtime.files import atomic_output

CONFIG_KEY = "smoe_config"


def full_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The shared weights and every expert of one DeepSpeed checkpoint, by their ep_size 1 names."""
    state = dict(torch.load(tag_dir / schema.MODEL_STATES, map_location="cpu", weights_only=False)["module"])
    for expert_file in sorted(tag_dir.glob(schema.EXPERT_FILES)):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=False))
    return state


def consolidate(run_dir: Path, out: Path) -> Path:
    run = RunDir(Path(run_dir))
    config = replace(run.load_config(), ep_size=1)
    family = family_of(config, run.root)
    model = family.build(config)
    tag = loadable_tag(run.checkpoints, model)  # checked file by file; an older one if the newest is damaged
    state = full_state_dict(run.checkpoints / tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {run.checkpoints / tag} does not fit the run's config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): is config.json from another run?")
    return save_consolidated(model, config, Path(out), checkpoint=tag, run=str(run.root), **family.metadata())


def save_consolidated(model: torch.nn.Module, config: TrainConfig, out: Path, **metadata: str) -> Path:
    """``model``'s tensors in one safetensors file with ``config`` (and ``metadata``) beside them,
    written under a temporary name first. `smoe slim` writes Transformer-XL models this way too."""
    # Tied tensors (input and output embeddings) are stored once each: safetensors refuses shared storage.
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(config.to_dict()), **metadata})
    return out


def read_consolidated(path: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], dict[str, str]]:
    """The config, the tensors and the metadata of a consolidated file, for callers that build
    their own model."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if CONFIG_KEY not in metadata:
            raise ValueError(f"{path} is not a consolidated smoe model (no '{CONFIG_KEY}' metadata): "
                             "make one with `smoe ckpt consolidate RUN OUT`")
        config = TrainConfig.from_saved(json.loads(metadata[CONFIG_KEY]))
        return config, {name: f.get_tensor(name) for name in f.keys()}, metadata


def load_consolidated(path: Path) -> tuple[TrainConfig, torch.nn.Module]:
    """The config and the model (Transformer-XL, BERT or RoBERTa; on CPU, eval mode) from a consolidated file."""
    config, state, metadata = read_consolidated(path)
    model = family_of(config, metadata=metadata).build(config)
    model.load_state_dict(state)
    return config, model.eval()
