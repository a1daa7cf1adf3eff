import random
from collections import Counter

import pytest
import torch

from smoe.routing import TopKSchedule
from smoe.routing.schedule import StepPlan, draw_layer_ks


def test_linear_follows_the_paper_formula_at_start_middle_and_end():
    schedule = TopKSchedule.linear(k_min=8, k_max=16, total_steps=400_000)
    assert schedule(0) == 8
    assert schedule(200_000) == 12
    assert schedule(100_000) == 10
    assert schedule(400_000) == 16
    assert schedule(10_000_000) == 16  # clipped past the end


def test_linear_rounds_like_the_reference_code():
    schedule = TopKSchedule.linear(k_min=1, k_max=16, total_steps=100)
    assert [schedule(s) for s in (0, 3, 4, 50, 97, 100)] == [round(15 * s / 100) + 1 for s in (0, 3, 4, 50, 97, 100)]


@pytest.mark.parametrize("schedule", [
    TopKSchedule.linear(1, 16, 1000),
    TopKSchedule.step([(0, 1), (100, 2), (300, 8), (900, 16)]),
    TopKSchedule.constant(4),
])
def test_monotone_and_within_bounds(schedule):
    ks = [schedule(step) for step in range(0, 1200, 7)]
    assert ks == sorted(ks)
    assert min(ks) >= schedule.k_min and max(ks) <= schedule.k_max


def test_step_schedule_picks_the_last_milestone_reached():
    schedule = TopKSchedule.step([(0, 1), (100, 2), (300, 8)])
    assert [schedule(s) for s in (0, 99, 100, 299, 300, 5000)] == [1, 1, 2, 2, 8, 8]


def test_restore_from_state_gives_the_same_k_at_every_step():
    schedule = TopKSchedule.step([(0, 2), (10, 4)])
    restored = TopKSchedule.from_state_dict(schedule.state_dict())
    assert restored == schedule
    linear = TopKSchedule.linear(2, 9, 77)
    again = TopKSchedule.from_state_dict(linear.state_dict())
    assert [again(s) for s in range(100)] == [linear(s) for s in range(100)]


@pytest.mark.parametrize("build, message", [
    (lambda: TopKSchedule.linear(0, 4, 10), "k_min"),
    (lambda: TopKSchedule.linear(5, 4, 10), "k_min (5) is larger than k_max (4)"),
    (lambda: TopKSchedule.linear(1, 4, 0), "total_steps"),
    (lambda: TopKSchedule(kind="cosine"), "kind 'cosine' is unknown"),
    (lambda: TopKSchedule.step([(5, 1)]), "must start at step 0"),
    (lambda: TopKSchedule.step([(0, 4), (10, 2)]), "must not decrease"),
])
def test_bad_schedules_name_the_field(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_k_max_above_the_number_of_experts_is_refused():
    with pytest.raises(ValueError, match=r"k_max \(32\) is larger than the number of experts \(16\)"):
        TopKSchedule.linear(1, 32, 10).check_experts(16)
    TopKSchedule.linear(1, 16, 10).check_experts(16)


def test_a_plan_is_the_identity_until_the_end_moves():
    plan = StepPlan(20)
    assert [plan(s) for s in (0, 7, 20)] == [0, 7, 20] and plan.planned_steps == 20
    assert plan.resumed(10, 20) is plan


@pytest.mark.parametrize("new_end", [100, 14])
def test_moving_the_end_stretches_what_was_left_and_keeps_k_monotone(new_end):
    """Planned for 20 steps, resumed at step 10 to end at 100 (or 14): k goes on from its value at
    10 without a jump, never decreases, and reaches k_max exactly at the new end."""
    before = TopKSchedule.linear(1, 16, 20)
    plan = StepPlan(20).resumed(10, new_end)
    after = TopKSchedule.linear(1, 16, new_end, plan.earlier)
    assert plan.earlier == ((10, 20),)
    assert [after(s) for s in range(11)] == [before(s) for s in range(11)]
    ks = [after(s) for s in range(new_end + 5)]
    assert ks == sorted(ks) and after(new_end) == 16 and ks.index(16) > 10 + 0.9 * (new_end - 10)  # not before
    assert after(10 + (new_end - 10) // 2) == before(15)  # halfway through the rest: the old plan's 15


def test_plans_compose_over_several_resumes_and_restore_from_state():
    plan = StepPlan(20).resumed(10, 100).resumed(55, 70)
    assert plan.earlier == ((10, 20), (55, 100))
    assert plan(55) == pytest.approx(15.0) and plan(70) == 20  # half of what was left at 55, then all of it
    schedule = TopKSchedule.linear(1, 16, 70, plan.earlier)
    restored = TopKSchedule.from_state_dict(schedule.state_dict())
    assert restored == schedule and [restored(s) for s in range(80)] == [schedule(s) for s in range(80)]


@pytest.mark.parametrize("build, message", [
    (lambda: StepPlan(20).resumed(30, 25), "max_steps (25) is below step 30, where the run already is"),
    (lambda: StepPlan(5, ((10, 20),)), "max_steps (5) is below step 10"),
    (lambda: StepPlan(50, ((10, 20), (10, 30))), "each change needs a step after the one before"),
    (lambda: TopKSchedule("constant", 2, 2, earlier=((10, 20),)), "takes no earlier ends"),
])
def test_plans_that_do_not_fit_are_refused(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_per_layer_draws_are_a_pure_function_of_seed_step_and_range():
    """The same (seed, step, layers, range) gives the same ks: no state to checkpoint, and every rank agrees."""
    torch_state, random_state = torch.get_rng_state(), random.getstate()
    draws = [draw_layer_ks(1111, step, 6, 2, 5) for step in range(2000)]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == random_state  # untouched
    assert draws == [draw_layer_ks(1111, step, 6, 2, 5) for step in range(2000)]
    assert draws[0] != draws[1] and draws[0] != draw_layer_ks(1112, 0, 6, 2, 5)
    assert any(len(set(ks)) > 1 for ks in draws)  # layers differ within a step
    assert draw_layer_ks(1111, 7, 3, 2, 5) == draw_layer_ks(1111, 7, 6, 2, 5)[:3]  # layer i: the i-th draw
    counts = Counter(k for ks in draws for k in ks)
    assert sorted(counts) == [2, 3, 4, 5] and all(abs(n / 12_000 - 0.25) < 0.02 for n in counts.values())
    assert draw_layer_ks(1111, 3, 4, 3, 3) == [3, 3, 3, 3]


def test_layer_ks_draw_up_to_the_schedules_k():
    """Per-layer k's range is k_min..schedule(step): it widens as the schedule grows, and no layer runs
    more experts than the global schedule would."""
    schedule = TopKSchedule.linear(2, 8, 100)
    for step in range(0, 120, 3):
        ks = schedule.layer_ks(step, 12, seed=5)
        assert ks == draw_layer_ks(5, step, 12, 2, schedule(step)) and max(ks) <= schedule(step)
    assert schedule.layer_ks(0, 4, seed=5) == [2, 2, 2, 2]
    assert max(k for step in range(90, 120) for k in schedule.layer_ks(step, 12, seed=5)) == 8


def test_an_empty_range_is_refused():
    with pytest.raises(ValueError, match="the range 3..2 needs 1 <= k_low <= k_high"):
        draw_layer_ks(0, 0, 2, 3, 2)
