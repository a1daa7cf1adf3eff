"""TensorBoard from a distributed run: rank 0 writes, losses are averaged over the ranks,
tokens/s is summed, and a real `tensorboard` server serves the scalars over HTTP."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from smoe.launcher.runtime.distributed import free_port

from runs import scalars


def test_two_ranks_log_once_with_losses_averaged_and_tokens_summed(layout_runs):
    two, one = layout_runs / "ep2", layout_runs / "ep1"
    assert len(list((two / "tb").rglob("events.out.tfevents.*"))) == 1  # rank 0 only
    # The same global batch without dropout: the 2-rank loss is the 1-process loss only if it is the mean
    # over both ranks' rows (rank 0's own rows give another number).
    two_rank_loss, one_rank_loss = scalars(two, "train/loss"), scalars(one, "train/loss")
    assert sorted(two_rank_loss) == [1, 2, 3, 4, 5, 6]
    for step, loss in two_rank_loss.items():
        assert loss == pytest.approx(one_rank_loss[step], abs=1e-5)
    # Summed over ranks, tokens/s x seconds/step is the global tokens per step (batch 4 x 16);
    # rank 0's own rate would give half.
    tokens_per_s, step_time = scalars(two, "train/tokens_per_s"), scalars(two, "train/step_time_s")
    for step in two_rank_loss:
        assert 0.75 < tokens_per_s[step] * step_time[step] / 64 < 1.33


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.skipif(not shutil.which("tensorboard"), reason="needs the tensorboard command (pip install tensorboard)")
def test_a_tensorboard_server_serves_the_run(layout_runs):
    run_dir = layout_runs / "ep2"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tb"),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        deadline, tags = time.monotonic() + 90, {}
        while "train/bpc" not in next(iter(tags.values()), {}):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve train/bpc: {server.communicate()[0] if server.poll() else tags}")
            time.sleep(1)
            try:
                tags = get_json(f"{base}/tags")
            except OSError:
                pass
        (run_name,) = tags
        query = urllib.parse.urlencode({"run": run_name, "tag": "train/bpc"})
        served = {step: value for _, step, value in get_json(f"{base}/scalars?{query}")}
    finally:
        server.terminate()
        server.wait(timeout=30)
    loss = scalars(run_dir, "train/loss")
    assert sorted(served) == sorted(loss)
    for step, bpc in served.items():
        assert bpc == pytest.approx(loss[step] / math.log(2), rel=1e-5)
    assert {"train/loss", "train/tokens_per_s", "moe/top_k"} <= set(tags[run_name])
