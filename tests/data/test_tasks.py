"""Built-in tasks: rewards by hand, wrong answers never right, seeded draws."""

import pytest

from demoalign.data.tasks import (
    TASKS,
    AddTask,
    BracketTask,
    SortTask,
    get_task,
    task_examples,
    task_pairs,
    task_prompts,
)


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
    for (example, bad), prompt in zip(task_pairs(task, prompts, seed=7), prompts):
        good = example.response
        assert example.prompt == prompt
        assert task.reward(prompt, good) == 1.0
        assert task.reward(prompt, bad) == 0.0, (prompt, bad)
        assert bad.strip(), "a wrong response must be plausible, not empty"


def test_task_examples_are_seeded_and_distinct_by_seed():
    a, b, c = (
        task_examples("sort", 50, seed=0),
        task_examples("sort", 50, seed=0),
        task_examples("sort", 50, seed=1),
    )
    assert a == b and a != c
    assert all(TASKS["sort"].reward(e.prompt, e.response) == 1.0 for e in a)
    with pytest.raises(ValueError, match="sort"):
        get_task("parity")
