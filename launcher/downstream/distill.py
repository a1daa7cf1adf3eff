"""`smoe distill --teacher RUN --student DIR --out RUN`: knowledge distillation on SST-2.

The paper's Table 3 distils every pretrained model into the same single-expert
student: pass the same ``--student`` (e.g. `smoe slim ... --budget 1` output) for
every teacher, so that only the teacher differs. The teacher is a `smoe finetune sst2`
run (its fine-tuned classifier, frozen, at its own k); the student learns from its
softened predictions and from the labels::

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, label)

(Hinton et al. 2015; ``_T``: softmax at temperature T). ``RUN/result.json`` holds the
student's dev accuracy with the teacher's method and accuracy.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe.launcher.downstream.finetune import (add_config_arguments, config_from, describe, fine_tune, set_k,
                                               slim_record, write_result)
from smoe.launcher.downstream.tasks import Classifier, TaskModel, model_family
from smoe.launcher.downstream.tasks.sst2 import SST2


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True, help="a `smoe finetune sst2` run (or its model/ directory)")
    parser.add_argument("--student", required=True, help="the student's pretrained directory, e.g. `smoe slim "
                                                         "--budget 1` output; the same for every teacher")
    parser.add_argument("--out", required=True, help="directory for result.json and the student")
    parser.add_argument("--data", help="SST-2 directory with train.tsv and dev.tsv (default: GLUE through datasets)")
    parser.add_argument("--k", type=int, help="the student's top-k (default: its own)")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (default 2)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's soft targets (default 0.5)")
    add_config_arguments(parser)


class Distillation(TaskModel):
    """The student, trained against a frozen teacher: a task model whose loss mixes both targets."""

    def __init__(self, student: Classifier, teacher: Classifier, temperature: float, alpha: float):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = temperature, alpha
        self.method = student.method
        self.default_lr = student.default_lr
        teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout in the targets
        return self

    def forward(self, batch: list) -> torch.Tensor:
        logits, aux_loss = self.student.outputs(batch)
        with torch.no_grad():
            teacher_logits = self.teacher.outputs(batch)[0].float()
        T = self.temperature
        soft = F.kl_div(F.log_softmax(logits.float() / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                        log_target=True, reduction="batchmean") * T * T
        hard = F.cross_entropy(logits.float(), self.student.labels(batch))
        return self.alpha * soft + (1 - self.alpha) * hard + aux_loss

    def evaluate(self, examples: list) -> dict[str, float]:
        return self.student.evaluate(examples)

    def save(self, out: Path) -> None:
        self.student.save(out)


def teacher_dir(path: Path) -> tuple[Path, dict | None]:
    """The fine-tuned model of a `smoe finetune sst2` run, and the run's result (None given a bare directory)."""
    if not path.is_dir():
        raise FileNotFoundError(f"--teacher {path} " + ("is a file" if path.exists() else "does not exist")
                                + ": pass a `smoe finetune sst2` run (or its model/ directory)")
    result_file = path / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("task") != "sst2":
            raise ValueError(f"--teacher {path} was fine-tuned on {result.get('task')}: distillation runs on sst2")
        return path / "model", result
    config_file = path / "config.json"
    if config_file.is_file() and not any("SequenceClassification" in name for name in
                                         json.loads(config_file.read_text()).get("architectures") or []):
        raise ValueError(f"--teacher {path} holds no fine-tuned classifier: pass a `smoe finetune sst2` run")
    return path, None


def run(args) -> None:
    from smoe.launcher.runtime.distributed import init_distributed

    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature} must be positive, e.g. 2")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha {args.alpha} must be in [0, 1]: the weight of the teacher's soft targets, e.g. 0.5")
    if args.k is not None and args.k < 1:  # the upper bound needs the student: checked when it is built
        raise ValueError(f"--k {args.k} must be at least 1")
    config = config_from(args)
    teacher_path, teacher_result = teacher_dir(Path(args.teacher))
    task = SST2()
    split = task.splits(args.data)[0]
    init_distributed()
    torch.manual_seed(config.seed)
    teacher = task.build(teacher_path, split, config.max_length)
    student = task.build(Path(args.student), split, config.max_length)
    k = set_k(student, args.k)
    train = split.train[:config.max_train_examples or None]
    if teacher_result is None:
        teacher_result = {"method": teacher.method, "dev": teacher.evaluate(split.dev)}
    model = fine_tune(Distillation(student, teacher, args.temperature, args.alpha), train, config,
                      what=f"distilling {teacher.method} ({args.teacher}) into {args.student} (k={k or '-'})")
    metrics = student.evaluate(split.dev)
    result = {"task": task.name, "kind": "distillation", "model": args.student,
              "family": model_family(Path(args.student)), **slim_record(Path(args.student)), **describe(student, k),
              "teacher": str(args.teacher), "teacher_method": teacher_result["method"],
              "teacher_dev": teacher_result["dev"], "temperature": args.temperature, "alpha": args.alpha,
              "metric": task.metric, "dev": metrics, "splits": [{"split": split.name, **metrics}],
              "train_examples": len(train), **asdict(config)}
    write_result(Path(args.out), result, [(split.name, model)])
