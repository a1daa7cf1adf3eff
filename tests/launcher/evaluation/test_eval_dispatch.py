"""`smoe eval` of a run whose `dispatch=auto` chose `grouped` where grouped_mm ran (bf16 on an H100)
and that is evaluated where it cannot (fp32): the layer takes the rule instead of refusing."""

from __future__ import annotations

import json

from runs import smoe, train


def test_eval_of_a_run_that_timed_grouped_takes_the_rule_where_grouped_cannot_run(corpus, tmp_path):
    # Experts of d_ff / num_experts = 6 columns: 24 bytes in fp32, not the 16-byte multiple grouped_mm
    # needs, as fp32 on an H100 is not a dtype it takes; RUN/dispatch.json says grouped at every k.
    out = tmp_path / "run"
    train(out, corpus, "dispatch=auto", "d_ff=24", "max_steps=2")
    rule = tmp_path / "rule.json"
    (out / "dispatch.json").unlink()  # without a timing: the rule
    smoe("eval", out, "--json", rule)
    (out / "dispatch.json").write_text(json.dumps({k: "grouped" for k in ("1", "2", "3", "4")}))
    timed = tmp_path / "timed.json"
    smoe("eval", out, "--json", timed)
    assert json.loads(timed.read_text())["rows"] == json.loads(rule.read_text())["rows"]
