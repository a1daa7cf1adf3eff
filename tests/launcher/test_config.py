"""The run config: presets, overrides (dotted for the router's options), renamed keys, saved configs."""

import dataclasses
import json

import pytest

from smoe.launcher.config import RENAMED, TrainConfig, build_config, parse_override
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
