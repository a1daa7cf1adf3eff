import pytest

from smoe.routing import TopKSchedule


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
