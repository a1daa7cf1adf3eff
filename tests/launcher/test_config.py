"""The run config: presets, overrides (dotted for the router's options), renamed keys, saved configs."""

import dataclasses
import json

import pytest

from smoe.launcher.config import RENAMED, TrainConfig, build_config, parse_override, resumed_config
from smoe.launcher.training.lr import lr_multiplier
from smoe.model.moe import moe_layers_of
from smoe.routing import RouterOptions


def overrides(*texts):
    return dict(parse_override(text) for text in texts)


def test_router_options_flow_whole_from_an_override_to_the_router():
    from smoe.launcher.families.transformer_xl import build_model

    config = build_config("tiny", overrides("method=smoe-learned", "router.balance_coef=0.5", "router.z_loss_coef=0.25"))
    assert config.router == RouterOptions(balance_coef=0.5, z_loss_coef=0.25)
    routers = [layer.deepspeed_moe.gate for layer in moe_layers_of(build_model(config))]
    assert routers and {(r.balance_coef, r.z_loss_coef) for r in routers} == {(0.5, 0.25)}


def test_every_router_option_is_a_dotted_key_of_its_type():
    for f in dataclasses.fields(RouterOptions):
        key, value = parse_override(f"router.{f.name}=0.125")
        assert (key, value) == (f"router.{f.name}", 0.125)
        assert getattr(build_config("tiny", {key: value}).router, f.name) == 0.125


def test_a_later_dotted_key_wins_over_the_section():
    config = TrainConfig.from_dict({"router": {"balance_coef": 0.1, "z_loss_coef": 0.2}, "router.balance_coef": 0.3})
    assert config.router == RouterOptions(balance_coef=0.3, z_loss_coef=0.2)


def test_the_config_saves_the_router_as_one_object_and_reads_it_back():
    config = build_config("tiny", overrides("router.balance_coef=0.05"))
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["router"] == {"balance_coef": 0.05, "z_loss_coef": 0.0} and "balance_coef" not in saved
    assert TrainConfig.from_saved(saved) == config


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_renamed_keys_still_work_as_overrides(old, new):
    key, value = parse_override(f"{old.replace('_', '-')}=64")
    assert key == new
    config = build_config("tiny", {key: value})
    section, _, name = new.rpartition(".")
    assert getattr(getattr(config, section) if section else config, name) == 64


def test_a_config_saved_before_the_renames_reads_back():
    """config.json of a run trained before d_ff and the router section (flat d_inner, balance_coef)."""
    values = build_config("tiny").to_dict()
    values["d_inner"] = values.pop("d_ff")
    values.pop("router")
    values.update(balance_coef=0.02, z_loss_coef=0.001)
    config = TrainConfig.from_saved(values)
    assert config.d_ff == build_config("tiny").d_ff
    assert config.router == RouterOptions(balance_coef=0.02, z_loss_coef=0.001)


def test_unknown_keys_name_the_closest():
    with pytest.raises(ValueError, match="config key 'router.nope' does not exist"):
        TrainConfig.from_dict({"router": {"nope": 1}})
    with pytest.raises(ValueError, match="did you mean 'd_ff'"):
        parse_override("d_fff=3")


def test_a_resume_changes_only_the_keys_given_and_says_which():
    saved = build_config("tiny", overrides("max_steps=20", "lr=5e-4"))
    config, changes = resumed_config(saved, overrides("max_steps=3000", "router.balance_coef=0.5", "eval_ks=1,2"))
    assert changes == ["router.balance_coef: 0.01 -> 0.5", "max_steps: 20 -> 3000", "eval_ks: 1,2,4,8,16 -> 1,2"]
    assert config == dataclasses.replace(saved, max_steps=3000, eval_ks=(1, 2),
                                         router=RouterOptions(balance_coef=0.5))  # lr stays the run's 5e-4
    assert resumed_config(saved, {}, preset="tiny") == (saved, [])


@pytest.mark.parametrize("given, preset, message", [
    ({}, "paper", "--preset paper: this run was started with preset tiny"),
    ({"method": "dense"}, None, "method: saved 'smoe-dropout', now 'dense'"),
    ({"d_model": 64}, None, "cannot resume: the config changes the model (d_model: saved 128, now 64)"),
])
def test_a_resume_refuses_another_preset_and_a_model_change(given, preset, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resumed_config(build_config("tiny"), given, preset)


def test_where_max_steps_changed_is_kept_by_smoe_not_given():
    with pytest.raises(ValueError, match="earlier_max_steps is kept by smoe"):
        parse_override("earlier_max_steps=10,20")
    saved = TrainConfig.from_dict({**build_config("tiny").to_dict(), "max_steps": 100, "earlier_max_steps": [[10, 20]]})
    assert TrainConfig.from_saved(json.loads(json.dumps(saved.to_dict()))) == saved
    with pytest.raises(ValueError, match=r"max_steps \(5\) is below step 10"):
        resumed_config(saved, {"max_steps": 5})


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_lr_follows_a_moved_end_without_a_jump_and_ends_at_lr_min(decay):
    """Planned for 20 steps (4 of warm-up), resumed at step 10 to end at 100: the lr at 10 is the one
    the run had there, it only decreases from there and reaches lr_min at step 100, not before."""
    before = build_config("tiny", overrides("max_steps=20", "warmup_steps=4", "lr_min=1e-5", f"lr_decay={decay}"))
    after = dataclasses.replace(before, max_steps=100, earlier_max_steps=((10, 20),))
    old, new = lr_multiplier(before), lr_multiplier(after)
    assert [new(s) for s in range(11)] == [old(s) for s in range(11)]
    lrs = [after.lr * new(s) for s in range(10, 101)]
    assert lrs == sorted(lrs, reverse=True) and max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < after.lr / 50
    assert lrs[-1] == pytest.approx(1e-5) and lrs[-2] > 1e-5 * 1.001
