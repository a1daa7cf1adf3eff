"""Math word problems (ASDiv-A, MAWPS, SVAMP) as the SVAMP repository ships them, and a safe
evaluator for their prefix equations.

Each CSV row is a problem whose numbers are masked in the text as ``number0``, ``number1``, ..
(``Question``), their values (``Numbers``, space separated), the equation in prefix notation
over ``+ - * /``, those slots and constants (``Equation``, e.g. ``/ number0 - number1 1.0``)
and the ``Answer``. A problem is solved when an equation's value equals the answer (a few
MAWPS answers are rounded or disagree with their own equation; they are kept as shipped).
"""

from __future__ import annotations

import csv
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("Question", "Numbers", "Equation", "Answer")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
SLOT_PREFIX = "number"  # the text's K-th number is the word numberK
SLOT = re.compile(rf"{SLOT_PREFIX}(\d+)")
CONSTANT = re.compile(r"\d+(\.\d+)?")
TOLERANCE = 1e-4  # relative and absolute: answers are shipped as floats
SOURCE = "the `data/` folder of the SVAMP repository (github.com/arkilpatel/SVAMP)"
FOLDS = tuple(f"fold{i}" for i in range(5))


@dataclass
class Problem:
    question: str  # numbers masked as number0, number1, ...
    numbers: tuple[float, ...]  # the value of numberK is numbers[K]
    equation: tuple[str, ...]  # prefix tokens: operators, numberK slots, constants
    answer: float


class EquationError(ValueError):
    """Why an equation has no value: it is not well-formed prefix, or divides by zero."""


def operand(token: str, numbers: Sequence[float]) -> float:
    """The value of a number slot or a constant."""
    slot = SLOT.fullmatch(token)
    if slot:
        index = int(slot.group(1))
        if index >= len(numbers):
            raise EquationError(f"{token} is not a number of the problem, which has {len(numbers)} "
                                f"(number0..number{len(numbers) - 1})")
        return numbers[index]
    if CONSTANT.fullmatch(token):
        return float(token)
    raise EquationError(f"unknown token {token!r}: use + - * /, number0.. or a constant like 1.0")


def evaluate_prefix(equation: Sequence[str], numbers: Sequence[float]) -> float:
    """The value of a prefix equation, read right to left on a stack (no eval of strings);
    raises :class:`EquationError` saying why when it has none."""
    if not equation:
        raise EquationError("the equation is empty")
    stack: list[float] = []
    for position in range(len(equation) - 1, -1, -1):
        token = equation[position]
        if token not in OPERATORS:
            stack.append(operand(token, numbers))
            continue
        if len(stack) < 2:
            raise EquationError(f"operator {token!r} (token {position + 1}) lacks an operand: the equation is "
                                "cut short")
        left, right = stack.pop(), stack.pop()
        if token == "/" and right == 0:
            raise EquationError(f"division by zero at token {position + 1}")
        stack.append(OPERATORS[token](left, right))
    if len(stack) > 1:
        raise EquationError(f"{len(stack) - 1} operand(s) left over: an operator is missing")
    return stack[0]


def solves(equation: Sequence[str], problem: Problem) -> bool:
    """Whether ``equation``'s value is the answer; raises :class:`EquationError` if it has none."""
    return math.isclose(evaluate_prefix(equation, problem.numbers), problem.answer, rel_tol=TOLERANCE,
                        abs_tol=TOLERANCE)


def solve_counts(equations: Sequence[Sequence[str]], problems: Sequence[Problem]) -> tuple[int, int]:
    """(solved, unparseable) over predicted ``equations``; an equation without a value is unsolved
    and counted as unparseable."""
    solved = unparseable = 0
    for equation, problem in zip(equations, problems, strict=True):
        try:
            solved += solves(equation, problem)
        except EquationError:
            unparseable += 1
    return solved, unparseable


def parse_row(row: dict, where: str) -> Problem:
    if None in row.values():
        raise ValueError(f"{where} has fewer fields than the header: quote fields holding commas")
    try:
        numbers = tuple(float(value) for value in row["Numbers"].split())
    except ValueError:
        raise ValueError(f"{where}: Numbers {row['Numbers']!r} is not a list of numbers separated by spaces")
    try:
        answer = float(row["Answer"])
    except ValueError:
        raise ValueError(f"{where}: Answer {row['Answer']!r} is not a number")
    slots = {int(index) for index in SLOT.findall(row["Question"])}
    if slots != set(range(len(numbers))):
        raise ValueError(f"{where}: the Question's slots {sorted(f'number{i}' for i in slots)} do not match its "
                         f"{len(numbers)} Numbers: the text needs number0..number{len(numbers) - 1}, one per value")
    equation = tuple(row["Equation"].split())
    try:
        evaluate_prefix(equation, numbers)
    except EquationError as error:
        raise ValueError(f"{where}: Equation {row['Equation']!r} cannot be evaluated: {error}")
    return Problem(row["Question"], numbers, equation, answer)


def read_problems(path: Path) -> list[Problem]:
    """The problems of one SVAMP-style CSV, refusing missing columns and malformed rows."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: each split's folder holds train.csv and dev.csv, as in "
                                f"{SOURCE}")
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        missing = [column for column in COLUMNS if column not in (rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)}: math word problems need "
                             f"{', '.join(COLUMNS)} (numbers masked as number0.. in the Question)")
        problems = [parse_row(row, f"{path}:{rows.line_num}") for row in rows]
    if not problems:
        raise ValueError(f"{path} holds no problem")
    return problems


def read_split(folder: Path) -> dict[str, list[Problem]]:
    """{"train", "dev"}: the problems of ``folder``'s train.csv and dev.csv."""
    return {split: read_problems(folder / f"{split}.csv") for split in ("train", "dev")}


def mwp_dir(data_dir: str | None, folder: str) -> Path:
    """``data_dir/folder``, checked: --data is the directory laid out as the SVAMP repository's data/."""
    if not data_dir:
        raise ValueError(f"--data is required for math word problems: the directory holding {folder}/, as in "
                         f"{SOURCE}")
    path = Path(data_dir) / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: --data must be the directory holding {folder}/, as in "
                                f"{SOURCE}")
    return path
