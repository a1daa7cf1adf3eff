"""`smoe train` / `smoe eval` end to end on a small byte file: real DeepSpeed engine,
real checkpoints, real TensorBoard events read back, real processes."""

from __future__ import annotations

import json

import pytest

from smoe.launcher.cli import main
from smoe.launcher.config import TrainConfig

from runs import SMALL, scalars, smoe


@pytest.mark.parametrize("method", ["smoe-dropout", "random"])
def test_resume_gives_the_same_losses_as_training_straight(corpus, tmp_path, method):
    common = ["--preset", "tiny", "--method", method, "--data-file", corpus, *SMALL, "max_steps=20"]
    smoe("train", "--out", tmp_path / "straight", *common)
    smoe("train", "--out", tmp_path / "split", *common, "--stop-at", "10")
    assert not (tmp_path / "split" / "eval.json").exists()  # stopped early: no final sweep yet
    resumed = smoe("train", "--out", tmp_path / "split", *common, "--resume")
    assert "resumed" in resumed.stdout and "at step 10" in resumed.stdout

    straight = scalars(tmp_path / "straight", "train/loss")
    split = scalars(tmp_path / "split", "train/loss")
    assert sorted(straight) == list(range(1, 21)) and sorted(split) == list(range(1, 21))
    assert [straight[s] for s in range(1, 21)] == [split[s] for s in range(1, 21)]
    assert json.loads((tmp_path / "split" / "eval.json").read_text()) == \
        json.loads((tmp_path / "straight" / "eval.json").read_text())


def test_training_logs_schedule_utilisation_and_learns(corpus, tmp_path):
    out = tmp_path / "run"
    result = smoe("train", "--out", out, "--preset", "tiny", "--data-file", corpus, *SMALL, "max_steps=40",
                  "lr=3e-3", "eval_every=20", "save_every=20")
    assert "ETA" in result.stdout and "tok/s" in result.stdout and "bpc" in result.stdout

    top_k = scalars(out, "moe/top_k")
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert [top_k[s] for s in sorted(top_k)] == [config.k_schedule()(s - 1) for s in sorted(top_k)]
    assert top_k[1] == 1 and top_k[40] == 4
    for tag in ("train/bpc", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
                "val/bpc", "moe/layer0/max_share", "moe/layer1/min_share", "moe/layer1/dead_experts"):
        assert scalars(out, tag), tag
    bpc = scalars(out, "train/bpc")
    assert sum(bpc[s] for s in range(36, 41)) / 5 < sum(bpc[s] for s in range(1, 6)) / 5 - 1.0
    assert sorted(scalars(out, "val/bpc")) == [20, 40]

    # each expert has its own checkpoint file; only the kept checkpoints remain
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == "step000040"
    assert len(list((out / "checkpoints" / tag).glob("layer_*_expert_*"))) == 2 * 4
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step000020", "step000040"]

    # the sweep at the end of training, and `smoe eval` reproducing it from the checkpoint
    report = json.loads((out / "eval.json").read_text())
    rows = report["rows"]
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[0]["active_params"] < rows[1]["active_params"] < rows[2]["active_params"]
    assert rows[0]["flops_per_token"] < rows[1]["flops_per_token"] < rows[2]["flops_per_token"]
    smoe("eval", out, "--k", "1,2,4", "--json", tmp_path / "eval.json", "--plot", tmp_path / "bpc.png")
    again = json.loads((tmp_path / "eval.json").read_text())["rows"]
    for a, b in zip(rows, again):
        assert a["valid_bpc"] == pytest.approx(b["valid_bpc"], abs=1e-6)
        assert a["test_bpc"] == pytest.approx(b["test_bpc"], abs=1e-6)
    assert (tmp_path / "bpc.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_run_reports_one_row(corpus, tmp_path):
    out = tmp_path / "dense"
    smoe("train", "--out", out, "--preset", "tiny", "--method", "dense-dropblock", "--data-file", corpus, *SMALL,
         "max_steps=4", "dropblock_size=8")
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["k"] is None
    assert scalars(out, "train/bpc") and not scalars(out, "moe/top_k")


def test_thor_hash_and_concrete_dropout_train(corpus, tmp_path):
    for method in ("thor", "hash", "dense-concrete"):
        out = tmp_path / method
        smoe("train", "--out", out, "--preset", "tiny", "--method", method, "--data-file", corpus, *SMALL,
             "max_steps=3", "eval_ks=2")
        assert scalars(out, "train/loss")
    assert scalars(tmp_path / "thor", "train/consistency_loss")
    assert all(loss != 0 for loss in scalars(tmp_path / "dense-concrete", "train/aux_loss").values())


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "nan"
    result = smoe("train", "--out", out, "--preset", "tiny", "--data-file", corpus, *SMALL, "max_steps=20",
                  "save_every=1", "lr=1e30", "clip=0", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "loss is nan" in message.lower() or "loss is inf" in message.lower()
    step = int(message.split(" at step ")[1].split()[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step{step - 1:06d}"
    assert f"step{step - 1:06d}" in message


# --- bad input: refused before anything is started or written ----------------------------------

def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def test_unknown_preset_method_and_key(capsys, corpus, tmp_path):
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--preset", "huge", "--data-file", corpus)
    assert code == 2 and "preset 'huge' is unknown" in err and "tiny" in err
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--method", "moe", "--data-file", corpus)
    assert code == 2 and "method 'moe' is unknown" in err and "smoe-dropout" in err
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--data-file", corpus, "max_step=3")
    assert code == 2 and "'max_step' does not exist" in err and "max_steps" in err
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--data-file", corpus, "k_max=32")
    assert code == 2 and "k_max" in err
    assert not (tmp_path / "x").exists()


def test_missing_and_too_short_data(capsys, tmp_path):
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--data-file", tmp_path / "nope.txt")
    assert code == 2 and "nope.txt" in err
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 3000)
    code, err = run_main(capsys, "train", "--out", tmp_path / "x", "--data-file", short)
    assert code == 2 and "tgt_len" in err and "batch" in err
    assert not (tmp_path / "x").exists()


def test_resume_refuses_a_shape_change_and_a_new_run_refuses_an_existing_dir(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(preset="tiny", data_file=str(corpus), d_model=64)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    before = (out / "config.json").read_bytes()
    code, err = run_main(capsys, "train", "--out", out, "--data-file", corpus, "--resume", "d_model=32")
    assert code == 2 and "d_model: saved 64, now 32" in err
    code, err = run_main(capsys, "train", "--out", out, "--data-file", corpus)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "config.json").read_bytes() == before


def _save_killed_midway(rank, world_size, corpus, out):
    from smoe.launcher.config import build_config, parse_override
    from smoe.launcher.training.trainer import Trainer

    overrides = dict(parse_override(o) for o in [*SMALL, "max_steps=20", f"data_file={corpus}"])
    trainer = Trainer(build_config("tiny", overrides), out)
    trainer.train(stop_at=10)
    deepspeed_save = trainer.engine.save_checkpoint

    def dies_after_deepspeed_files(*args, **kwargs):
        deepspeed_save(*args, **kwargs)
        raise KeyboardInterrupt("killed while saving")

    trainer.engine.save_checkpoint = dies_after_deepspeed_files
    trainer.step = 12
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert (out / "checkpoints" / "step000012").is_dir()  # half written
    assert (out / "checkpoints" / "latest").read_text() == "step000010"

    resumed = Trainer(build_config("tiny", overrides), out, resume=True)
    assert resumed.step == 10
    resumed.train(stop_at=11)
    assert (out / "checkpoints" / "latest").read_text() == "step000011"


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(corpus, tmp_path):
    from smoe.launcher.runtime.distributed import spawn

    spawn(_save_killed_midway, 1, corpus, tmp_path / "run")


def test_thor_averages_two_passes_and_adds_their_symmetric_kl():
    import torch

    from smoe.launcher.families import Pass
    from smoe.launcher.training.losses import micro_batch_losses, symmetric_kl

    logits_a, logits_b = torch.randn(5, 7), torch.randn(5, 7)
    first = Pass(torch.tensor(2.0), torch.tensor(0.5), [None], logits_a)
    second = Pass(torch.tensor(4.0), torch.tensor(1.5), [None], logits_b)
    alone = micro_batch_losses(first, None, 2.0)
    assert float(alone["total"]) == 2.5 and "consistency" not in alone
    both = micro_batch_losses(first, second, 2.0)
    kl = float(symmetric_kl(logits_a, logits_b))
    assert kl > 0 and float(symmetric_kl(logits_a, logits_a)) == pytest.approx(0.0, abs=1e-6)
    assert (float(both["ce"]), float(both["aux"])) == (3.0, 1.0)
    assert float(both["total"]) == pytest.approx(3.0 + 1.0 + 2.0 * kl)
    # masked-LM: the term is read at the scored (masked) positions only
    scored = torch.tensor([True, False, True, False, False])
    masked = micro_batch_losses(first._replace(scored=scored), second._replace(scored=scored), 2.0)
    assert float(masked["consistency"]) == pytest.approx(float(symmetric_kl(logits_a[scored], logits_b[scored])))


def test_auto_dispatch_is_timed_once_saved_and_reused_by_resume_and_eval(corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--data-file", corpus, *SMALL, "dispatch=auto", "max_steps=4", "eval_ks=1,4"]
    first = smoe("train", "--out", out, *common, "--stop-at", "2")
    choices = json.loads((out / "dispatch.json").read_text())
    assert sorted(choices) == ["1", "2", "3", "4"]  # the schedule's ks and eval_ks
    assert "dispatch=auto, fastest at each k on this device" in first.stdout
    assert f"k 1 ({choices['1']})" in first.stdout
    # A resume and `smoe eval` run what the run chose, never a new timing.
    (out / "dispatch.json").write_text(json.dumps({k: "reference" for k in choices}))
    resumed = smoe("train", "--out", out, *common, "--resume")
    assert "dispatch=auto, as timed when the run started: 1: reference" in resumed.stdout
    assert "k 3 (reference)" in resumed.stdout
    assert json.loads((out / "dispatch.json").read_text()) == {k: "reference" for k in choices}
    evaluated = smoe("eval", out, "--k", "4", "--json", tmp_path / "eval.json")
    run_rows = json.loads((out / "eval.json").read_text())["rows"]
    assert json.loads((tmp_path / "eval.json").read_text())["rows"] == run_rows[1:]  # k = 4, as the run ran it
    assert "valid" in evaluated.stdout
