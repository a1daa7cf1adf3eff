"""`smoe finetune`'s loop on two real gloo ranks: each rank trains on its own share of every
batch, on the engine its --ds-config describes (here bf16)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from smoe.launcher.downstream.finetune import FinetuneConfig, fine_tune
from smoe.launcher.downstream.tasks.base import TaskModel
from smoe.launcher.runtime.distributed import spawn

EXAMPLES = list(range(100))  # 12 batches of 8 and one of 4


class RecordingClassifier(TaskModel):
    """Is the example above 50? A linear classifier that notes every example it is fed."""

    method = "dense"

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.seen: list[int] = []

    def forward(self, batch: list) -> torch.Tensor:
        self.seen += batch
        x = torch.tensor(batch, dtype=self.linear.weight.dtype, device=self.device)[:, None] / 100
        return F.cross_entropy(self.linear(x).float(), (x[:, 0] > 0.5).long())


def _fine_tune_on_rank(rank, world, ds_config, out):
    torch.manual_seed(0)
    model = fine_tune(RecordingClassifier(), EXAMPLES, FinetuneConfig(batch_size=8, epochs=1, ds_config=ds_config))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": model.seen, "dtype": str(model.linear.weight.dtype)}))


def test_two_ranks_fine_tune_on_disjoint_shares_with_the_ds_config(tmp_path):
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    spawn(_fine_tune_on_rank, 2, str(bf16), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == EXAMPLES  # one epoch: every example exactly once
    assert all(len(r["seen"]) == 50 for r in ranks)
    assert all(r["dtype"] == "torch.bfloat16" for r in ranks)  # the engine of the ds_config, not fp32
