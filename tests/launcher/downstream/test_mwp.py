"""Math word problems (`smoe finetune asdiv-a|mawps|svamp`): the prefix-equation evaluator, the
reader's errors, the equation decoder, and fine-tuning a tiny BERT that must learn which operator
a problem's wording asks for."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from smoe.data.mwp import EquationError, Problem, evaluate_prefix, read_problems, solve_counts, solves
from smoe.launcher.downstream.tasks import get_task
from smoe.launcher.downstream.tasks.mwp import GRAMMAR, load_decoder, save_decoder, slot_positions, symbols_of
from smoe.model.equation_decoder import DecoderConfig, EquationDecoder

from runs import smoe


@pytest.mark.parametrize("equation, numbers, value", [
    ("number0", [7.0], 7.0),
    ("+ number0 number1", [3.0, 4.0], 7.0),
    ("- number1 number0", [3.0, 4.0], 1.0),
    ("/ number0 - number1 1.0", [6.0, 4.0], 2.0),
    ("* + number0 number1 - number2 0.5", [1.0, 2.0, 3.0], 7.5),
    ("* / number0 100.0 number10", [50.0] + [0.0] * 9 + [8.0], 4.0),
])
def test_prefix_equations_evaluate(equation, numbers, value):
    assert evaluate_prefix(equation.split(), numbers) == pytest.approx(value)


@pytest.mark.parametrize("equation, numbers, reason", [
    ("+ number0", [1.0], "operator '+' (token 1) lacks an operand"),
    ("* number0 + number1", [1.0, 2.0], "operator '+' (token 3) lacks an operand"),
    ("number0 number1", [1.0, 2.0], "1 operand(s) left over"),
    ("+ number0 number1 number0", [1.0, 2.0], "1 operand(s) left over"),
    ("/ number0 - number1 number1", [1.0, 2.0], "division by zero at token 1"),
    ("+ number0 number2", [1.0, 2.0], "number2 is not a number of the problem, which has 2"),
    ("^ number0 number1", [1.0, 2.0], "unknown token '^'"),
    ("+ number0 1e3", [1.0], "unknown token '1e3'"),
    ("+ number0 __import__", [1.0], "unknown token '__import__'"),
    ("", [1.0], "the equation is empty"),
])
def test_prefix_equations_without_a_value_say_why(equation, numbers, reason):
    with pytest.raises(EquationError) as error:
        evaluate_prefix(equation.split(), numbers)
    assert reason in str(error.value)


def test_solved_means_the_answer_within_tolerance_and_unparseable_is_counted_apart():
    third = Problem("a number0 b number1", (1.0, 3.0), ("/", "number0", "number1"), 0.33333)
    assert solves("/ number0 number1".split(), third) and not solves("- number1 number0".split(), third)
    predictions = ["/ number0 number1", "* number0 number1", "/ number0", "/ number1 - number0 1.0", "number0 +"]
    assert solve_counts([p.split() for p in predictions], [third] * 5) == (1, 3)


def write_csv(path, rows, columns=("Question", "Numbers", "Equation", "Answer")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


GOOD = ("ann has number0 pens and gets number1 more . how many pens ?", "3 4.5", "+ number0 number1", "7.5")


@pytest.mark.parametrize("row, message", [
    (GOOD[:3] + ("seven",), "Answer 'seven' is not a number"),
    (GOOD[:1] + ("3 four",) + GOOD[2:], "Numbers '3 four' is not a list of numbers"),
    (GOOD[:2] + ("+ number0 number2", "7.5"), "Equation '+ number0 number2' cannot be evaluated: number2 is not"),
    (GOOD[:2] + ("+ number0", "7.5"), "Equation '+ number0' cannot be evaluated: operator '+' (token 1) lacks"),
    (("ann has number0 pens .",) + GOOD[1:], "the Question's slots ['number0'] do not match its 2 Numbers"),
])
def test_reader_names_the_bad_row_and_what_is_wrong(tmp_path, row, message):
    write_csv(tmp_path / "train.csv", [GOOD, row])
    with pytest.raises(ValueError) as error:
        read_problems(tmp_path / "train.csv")
    assert f"train.csv:3: {message}" in str(error.value)


def test_reader_reads_problems_and_refuses_missing_files_columns_and_data(tmp_path):
    write_csv(tmp_path / "train.csv", [GOOD])
    assert read_problems(tmp_path / "train.csv") == [Problem(GOOD[0], (3.0, 4.5), ("+", "number0", "number1"), 7.5)]
    write_csv(tmp_path / "cols.csv", [GOOD[:3]], columns=("Question", "Numbers", "Equation"))
    with pytest.raises(ValueError, match="lacks column\\(s\\) Answer: math word problems need Question, Numbers"):
        read_problems(tmp_path / "cols.csv")
    with pytest.raises(FileNotFoundError, match="none.csv does not exist: each split's folder holds train.csv"):
        read_problems(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="--data is required .*mawps-asdiv-a_svamp/.*arkilpatel/SVAMP"):
        get_task("svamp").splits(None)
    with pytest.raises(FileNotFoundError, match="cv_mawps does not exist: --data must be the directory holding"):
        get_task("mawps").splits(str(tmp_path))
    (tmp_path / "cv_asdiv-a" / "fold0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="fold0/train.csv does not exist"):
        get_task("asdiv-a").splits(str(tmp_path))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_number_slots_are_found_in_wordpiece_and_byte_bpe_text_and_lost_past_the_cut(family):
    from smoe.data.mlm import train_tokenizer

    tokenizer = train_tokenizer(["some pens and more pens and number pens"] * 20, family, 300)
    problem = Problem("ann has number1 pens , gets number0 more and number10 and again number1 .",
                      tuple(range(11)), ("number0",), 0.0)
    encoded = tokenizer([problem.question], return_offsets_mapping=True, return_tensors="pt")
    positions = slot_positions([problem], encoded["offset_mapping"])[0]
    for slot in (0, 1, 10):
        start, end = encoded["offset_mapping"][0, positions[slot]].tolist()
        text = problem.question[start:end].strip()
        assert text and f"number{slot}".startswith(text), (slot, start, end)
    assert positions[1] < positions[0] < positions[10]  # number1's first mention, before number0
    assert (positions[[2, 3]] == -1).all()
    cut = tokenizer([problem.question], return_offsets_mapping=True, truncation=True,
                    max_length=int(positions[10]), return_tensors="pt")
    assert slot_positions([problem], cut["offset_mapping"])[0, 10] == -1


def decoder_inputs(batch=2, length=5, slots=3, width=16):
    """Random encoder states (memory) and number-slot states, every position present."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, length, width, generator=generator), torch.ones(batch, length, dtype=torch.bool),
            torch.randn(batch, slots, width, generator=generator), torch.ones(batch, slots, dtype=torch.bool))


def test_generation_stops_when_the_equation_is_complete_or_cut_short_at_max_tokens():
    decoder = EquationDecoder(DecoderConfig(16, 2, max_tokens=4), ["+", "-", "2.0"], GRAMMAR).eval()
    with torch.no_grad():
        decoder.symbol_head.bias[decoder.symbol_ids["+"]] = 1e4  # always '+': never complete
        assert decoder.generate(*decoder_inputs()) == [("+",) * 4] * 2
        decoder.symbol_head.bias[decoder.symbol_ids["2.0"]] = 2e4  # an operand: complete at once
        assert decoder.generate(*decoder_inputs()) == [("2.0",)] * 2
        decoder.symbol_head.weight.zero_()
        decoder.symbol_head.bias.fill_(-1e4)  # only slots left, and of those only the problem's
        memory, memory_mask, slots, _ = decoder_inputs()
        assert decoder.generate(memory, memory_mask, slots, torch.tensor([[False, True, False], [True, False, False]])) \
            == [("number1",), ("number0",)]


def test_slots_are_pointed_at_and_fed_back_through_their_states_and_the_decoder_round_trips(tmp_path):
    decoder = EquationDecoder(DecoderConfig(16, 2), ["+", "-", "2.0"], GRAMMAR).eval()
    assert decoder.ids(("-", "number2", "2.0")) == [2, 4 + 2, 3]
    assert decoder.tokens([2, 6, 3]) == ("-", "number2", "2.0")
    memory, memory_mask, slots, slot_mask = decoder_inputs()
    slot_mask[0, 2] = False
    ids = torch.tensor([[0, 1, 5], [0, 2, 4]])  # <start> + number1, <start> - number0
    logits = decoder(ids, memory, memory_mask, slots, slot_mask)
    assert logits.shape == (2, 3, 4 + 3)
    assert torch.isinf(logits[..., 0]).all() and torch.isinf(logits[0, :, 6]).all()
    assert logits[1, :, 1:].isfinite().all()
    moved = slots.clone()
    moved[:, 1] += 1.0
    changed = (decoder(ids, memory, memory_mask, moved, slot_mask) != logits).tolist()
    pointer_only = [False] * 5 + [True, False]  # number1's logit; <start> and the absent number2 stay -inf
    assert changed[1] == [pointer_only] * 3
    assert changed[0] == [pointer_only] * 2 + [[False] + [True] * 5 + [False]]  # after number1 is fed back
    save_decoder(decoder, tmp_path)
    torch.testing.assert_close(load_decoder(tmp_path).eval()(ids, memory, memory_mask, slots, slot_mask),
                               logits)
    with pytest.raises(ValueError, match="must not hold <start> or number slots"):
        EquationDecoder(DecoderConfig(16, 2), ["+", "number0"], GRAMMAR)
    assert symbols_of([Problem("", (), ("*", "100.0", "+", "number0", "0.5"), 0.0)]) == [*"+-*/", "0.5", "100.0"]


# The operator is named by one word of the text; which numbers, in which order, too.
KEYWORDS = {"over": "+ number0 number1", "while": "- number0 number1", "brew": "* number0 number1",
            "jumps": "- number1 number0", "quietly": "* number0 2.0"}
FILLER = "the quick brown fox a lazy dog seven old wizards potions".split()


def synthetic_problems(size: int, seed: int) -> list[tuple[str, str, str, str]]:
    generator = torch.Generator().manual_seed(seed)

    def filler(n: int) -> str:
        return " ".join(FILLER[i] for i in torch.randint(len(FILLER), (n,), generator=generator))

    rows = []
    for i in range(size):
        keyword = list(KEYWORDS)[i % len(KEYWORDS)]
        numbers = (torch.randperm(18, generator=generator)[:2] + 2).tolist()
        equation = KEYWORDS[keyword]
        if "number1" in equation:
            question = f"{filler(2)} number0 {filler(1)} {keyword} {filler(1)} number1 {filler(2)} ?"
        else:
            question, numbers = f"{filler(2)} number0 {filler(1)} {keyword} {filler(2)} ?", numbers[:1]
        answer = evaluate_prefix(equation.split(), numbers)
        rows.append((question, " ".join(map(str, numbers)), equation, str(answer)))
    return rows


@pytest.fixture(scope="module")
def slim_bert(bert_slim):
    return bert_slim(4)


def test_finetune_asdiv_a_learns_the_operators_over_five_folds(slim_bert, tmp_path):
    data = tmp_path / "mwp"
    for fold in range(5):
        write_csv(data / "cv_asdiv-a" / f"fold{fold}" / "train.csv", synthetic_problems(100, seed=fold))
        write_csv(data / "cv_asdiv-a" / f"fold{fold}" / "dev.csv", synthetic_problems(40, seed=100 + fold))
    result = smoe("finetune", "asdiv-a", "--model", slim_bert, "--data", data, "--out", tmp_path / "ft",
                  "--epochs", "5", "--lr", "3e-3", "--head-lr", "5e-3", "--batch-size", "16")
    assert "lr 0.003, head lr 0.005" in result.stdout
    report = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert [split["split"] for split in report["splits"]] == [f"fold{i}" for i in range(5)]
    for metric in ("solve_rate", "unparseable_fraction"):
        assert report["dev"][metric] == pytest.approx(statistics.fmean(s[metric] for s in report["splits"]))
    dev = read_problems(data / "cv_asdiv-a" / "fold0" / "dev.csv")
    trivial = max(solve_counts([equation.split()] * len(dev), dev)[0] / len(dev) for equation in KEYWORDS.values())
    assert report["metric"] == "solve_rate" and trivial <= 0.4
    assert report["dev"]["solve_rate"] > trivial + 0.4, result.stdout[-3000:]
    assert 0 <= report["dev"]["unparseable_fraction"] <= 1 - report["dev"]["solve_rate"]
    decoder = load_decoder(tmp_path / "ft" / "model-fold3")
    assert decoder.symbols[1:] == ["+", "-", "*", "/", "2.0"]
    assert (tmp_path / "ft" / "model-fold3" / "model.safetensors").is_file()
