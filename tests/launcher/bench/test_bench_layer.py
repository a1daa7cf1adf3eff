"""`smoe bench layer --device/--dtype`: records say where and in what precision they ran; what cannot run is
refused before anything is built."""

import json

import pytest
from runs import smoe


def test_bf16_on_cpu_writes_device_and_dtype(tmp_path):
    out = tmp_path / "bench.json"
    result = smoe("bench", "layer", "--sizes", "tiny", "--ks", "1,4", "--repeats", "1", "--dtype", "bf16",
                  "--device", "cpu", "--json", out)
    assert "CPU bf16" in result.stdout
    records = json.loads(out.read_text())
    assert [(r["method"], r["k"]) for r in records] == [(m, k) for k in (1, 4) for m in ("dense", "deepspeed", "smoe")]
    for record in records:
        assert (record["device"], record["dtype"]) == ("cpu", "bf16")
        assert record["median_ms"] > 0 and record["min_ms"] > 0
        assert record["peak_mb"] > 0


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs --device cuda; use bf16 or fp32 on CPU"),
    (["--ep", "--device", "cuda"], "needs NCCL on >=2 GPUs"),
])
def test_what_cannot_run_is_refused_up_front(args, message):
    result = smoe("bench", "layer", "--sizes", "tiny", "--no-memory", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
