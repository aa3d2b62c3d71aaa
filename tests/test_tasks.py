import math

import pytest

from demoalign.stats import mean_std, paired_t_test, verdict
from demoalign.tasks import TASKS, AddTask, BracketTask, SortTask, get_task, task_examples, task_pairs, task_prompts


@pytest.mark.parametrize(
    "task, prompt, right, wrongs",
    [
        (SortTask(), "sort: 3 9 1 4 1", "1 1 3 4 9", ["1 3 4 9", "1 1 4 3 9", "9 4 3 1 1", ""]),
        (AddTask(), "add: 4821 + 377", "5198", ["5188", "4821377", "5198.0", ""]),
        (AddTask(), "add: 0 + 0", "0", ["00", "1"]),
        (BracketTask(), "close: ( [ {", "} ] )", ["] } )", ") ] }", "} ]"]),
    ],
)
def test_rewards_by_hand(task, prompt, right, wrongs):
    assert task.solve(prompt) == right
    assert task.reward(prompt, right) == 1.0
    assert task.reward(prompt, f" {right}\n") == 1.0  # surrounding whitespace is not an error
    for wrong in wrongs:
        assert task.reward(prompt, wrong) == 0.0, wrong


@pytest.mark.parametrize("name", sorted(TASKS))
def test_wrong_generator_never_gives_a_correct_response(name):
    task = get_task(name)
    prompts = task_prompts(task, 3000, seed=7)
    for prompt, good, bad in task_pairs(task, prompts, seed=7):
        assert task.reward(prompt, good) == 1.0
        assert task.reward(prompt, bad) == 0.0, (prompt, bad)
        assert bad.strip(), "a wrong response must be plausible, not empty"


def test_task_examples_are_seeded_and_distinct_by_seed():
    a, b, c = task_examples("sort", 50, seed=0), task_examples("sort", 50, seed=0), task_examples("sort", 50, seed=1)
    assert a == b and a != c
    assert all(TASKS["sort"].reward(e.prompt, e.response) == 1.0 for e in a)
    with pytest.raises(ValueError, match="sort"):
        get_task("parity")


def test_paired_t_test_by_hand():
    # diffs 2, 3, 0: mean 5/3, sd sqrt(7/3), t = (5/3) / (sqrt(7/3)/sqrt(3)) = 1.88982...
    t, p = paired_t_test([3, 5, 4], [1, 2, 4])
    assert t == pytest.approx((5 / 3) / (math.sqrt(7 / 3) / math.sqrt(3)))
    # Student t with 2 df has the closed form two-sided p = 1 − t / sqrt(2 + t²).
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert p == pytest.approx(0.19937, abs=1e-4)
    assert paired_t_test([1, 2], [1, 2]) == (0.0, 1.0)
    assert paired_t_test([2, 3], [1, 2])[1] == 0.0
    # Differences equal up to float rounding are equal: no p-value from rounding noise.
    assert paired_t_test([0.94, 0.9366666666666666, 0.9433333333333334], [0.9333333333333333, 0.93, 0.9366666666666668]) == (float("inf"), 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert verdict([3, 5, 4], [1, 2, 4])[0] == "not significant"
    assert verdict([1, 2, 4], [3, 5, 4])[0] == "no"
    assert verdict([5.0, 6.1, 7.0, 8.1], [1.0, 2.0, 3.1, 4.0])[0] == "yes"
