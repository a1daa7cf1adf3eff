import json
import tomllib

import pytest

from smoe.launcher.cli import main

from runs import REPO


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["eval", "--help"], ["bench", "--help"],
                                  ["bench", "layer", "--help"], ["bench", "quality", "--help"],
                                  ["ckpt", "consolidate", "--help"], ["convert", "--help"], ["slim", "--help"],
                                  ["finetune", "--help"], ["distill", "--help"], ["report", "--help"]])
def test_help_on_every_command(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert "usage: smoe" in capsys.readouterr().out


def test_every_package_folder_is_in_the_distribution():
    """A folder missing from pyproject's `packages` works from a checkout and is absent from a wheel."""
    root = REPO
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("smoe", *init.parent.relative_to(root).parts)) for init in root.glob("**/__init__.py")
               if not {"tests", "runs", "build"} & set(init.relative_to(root).parts) and ".git" not in init.parts}
    assert folders == listed


def test_bench_layer_writes_its_records(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "layer", "--sizes", "tiny", "--tokens", "128", "--ks", "1,16", "--repeats", "2",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["method"], r["k"]) for r in records] == [
        (m, k) for k in (1, 16) for m in ("dense", "deepspeed", "smoe")]
    for record in records:
        assert {"size", "method", "k", "median_ms", "min_ms", "max_ms", "ratio_to_dense"} <= record.keys()
        assert record["min_ms"] <= record["median_ms"] <= record["max_ms"]
        assert record["peak_mb"] > 0
    dense = [r for r in records if r["method"] == "dense"]
    assert all(r["ratio_to_dense"] == 1.0 for r in dense)
    ours = [r for r in records if r["method"] == "smoe"]
    assert all(r["path"] in ("sorted", "grouped", "masked-dense") for r in ours)  # auto: the fastest timed at each k
    assert ours[0]["ratio_to_dense"] == pytest.approx(ours[0]["median_ms"] / dense[0]["median_ms"], rel=0.02)


def test_bad_bench_size_is_a_clear_error(capsys):
    assert main(["bench", "layer", "--sizes", "huge", "--no-memory"]) == 2
    assert "'huge' is unknown" in capsys.readouterr().err
