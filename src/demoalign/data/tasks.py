"""Built-in tasks with a verifiable reward: for the demo, for trials (`data=task:sort`) and as
test fixtures. Each task has a seeded prompt generator, the correct demonstration, a 0/1 reward,
and a generator of plausible WRONG responses (for held-out pair metrics)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .formats import Example, Preference


@dataclass(frozen=True)
class SortTask:
    """ "sort: 3 9 1 4" → "1 3 4 9" (digits, with repeats)."""

    min_len: int = 6
    max_len: int = 10
    name: str = "sort"

    def prompt(self, rng: random.Random) -> str:
        digits = [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]
        return "sort: " + " ".join(map(str, digits))

    @staticmethod
    def _digits(prompt: str) -> list[str]:
        return prompt.split(":", 1)[1].split()

    def solve(self, prompt: str) -> str:
        return " ".join(sorted(self._digits(prompt)))

    def reward(self, prompt: str, response: str) -> float:
        return float(response.strip() == self.solve(prompt))

    def wrong(self, prompt: str, rng: random.Random) -> str:
        """Sorted but for one defect: two unequal neighbours swapped, one digit dropped, or one
        digit changed; never the right answer."""
        answer = sorted(self._digits(prompt))
        swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        kind = rng.choice(["swap", "drop", "change"] if swaps else ["drop", "change"])
        out = list(answer)
        if kind == "swap":
            i = rng.choice(swaps)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == "drop":
            del out[rng.randrange(len(out))]
        else:
            i = rng.randrange(len(out))
            out[i] = rng.choice([d for d in "0123456789" if d != out[i]])
            out.sort()
        return " ".join(out)


@dataclass(frozen=True)
class AddTask:
    """ "add: 4821 + 377" → "5198"."""

    max_digits: int = 4
    name: str = "add"

    def prompt(self, rng: random.Random) -> str:
        a = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        return f"add: {a} + {b}"

    @staticmethod
    def _operands(prompt: str) -> tuple[int, int]:
        a, b = prompt.split(":", 1)[1].split("+")
        return int(a), int(b)

    def solve(self, prompt: str) -> str:
        a, b = self._operands(prompt)
        return str(a + b)

    def reward(self, prompt: str, response: str) -> float:
        return float(response.strip() == self.solve(prompt))

    def wrong(self, prompt: str, rng: random.Random) -> str:
        """The sum with one digit changed (a typical carry slip); never the right answer."""
        answer = self.solve(prompt)
        i = rng.randrange(len(answer))
        choices = [
            d
            for d in "0123456789"
            if d != answer[i] and not (i == 0 and d == "0" and len(answer) > 1)
        ]
        return answer[:i] + rng.choice(choices) + answer[i + 1 :]


@dataclass(frozen=True)
class BracketTask:
    """ "close: ( [ {" → "} ] )": the closing sequence of a bracket prefix."""

    min_len: int = 3
    max_len: int = 7
    name: str = "brackets"
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}

    def prompt(self, rng: random.Random) -> str:
        return "close: " + " ".join(
            rng.choice("([{<") for _ in range(rng.randint(self.min_len, self.max_len))
        )

    def solve(self, prompt: str) -> str:
        return " ".join(self.pairs[c] for c in reversed(prompt.split(":", 1)[1].split()))

    def reward(self, prompt: str, response: str) -> float:
        return float(response.strip() == self.solve(prompt))

    def wrong(self, prompt: str, rng: random.Random) -> str:
        """Two unequal closers swapped, or one closer replaced; never the right answer."""
        out = self.solve(prompt).split()
        swaps = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        if swaps and rng.random() < 0.5:
            i = rng.choice(swaps)
            out[i], out[i + 1] = out[i + 1], out[i]
        else:
            i = rng.randrange(len(out))
            out[i] = rng.choice([c for c in ")]}>" if c != out[i]])
        return " ".join(out)


TASKS = {"sort": SortTask(), "add": AddTask(), "brackets": BracketTask()}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_prompts(task, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{task.name}:{seed}")
    return [task.prompt(rng) for _ in range(n)]


def heldout_prompts(task, n: int, seed: int, exclude: set[str]) -> list[str]:
    """n prompts drawn as `task_prompts` draws them, skipping every prompt in `exclude` (the
    training prompts): for small prompt spaces (add, brackets) the draws would overlap."""
    rng = random.Random(f"{task.name}:{seed}")
    out: list[str] = []
    for _ in range(1000 * n):
        if len(out) == n:
            return out
        prompt = task.prompt(rng)
        if prompt not in exclude:
            out.append(prompt)
    if len(out) == n:
        return out
    raise ValueError(
        f"task {task.name}: could not draw {n} prompts outside the "
        f"{len(exclude)} training prompts; lower the number of examples"
    )


def task_examples(name: str, n: int = 1000, seed: int = 0) -> list[Example]:
    """n demonstrations of a built-in task (`data=task:NAME`)."""
    task = get_task(name)
    return [Example(p, task.solve(p)) for p in task_prompts(task, n, seed)]


def task_pairs(task, prompts: list[str], seed: int) -> list[Preference]:
    """(the correct answer ≻ a plausible wrong one) for each prompt, for pair metrics."""
    rng = random.Random(f"{task.name}:pairs:{seed}")
    return [Preference(Example(p, task.solve(p)), task.wrong(p, rng)) for p in prompts]
