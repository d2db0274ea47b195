import json
import pickle
import random
import re
import string
import time

import pytest

from nanoseek.data.tasks import (TASKS, Arithmetic, Countdown, JsonlTask, LinearEquations, Problem, extract_answer,
                                 extract_think, get_task, is_well_formatted, load_jsonl_problems, needs_carry, solve)
from nanoseek.data.tasks.countdown import parse_expression


def arith(q):
    a, op, b = q[:-2].replace("-", " - ").replace("+", " + ").split()
    return Problem("arithmetic", q, str(int(a) + int(b) if op == "+" else int(a) - int(b)))


# ---- the completion format -------------------------------------------------------------------

def test_extract_answer_and_think():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> more <answer>2</answer>") == "2"
    assert extract_answer("<answer>1</answer><answer>2") == "1"          # last *complete* block
    assert extract_answer("<answer>a<answer>b</answer>") == "b"
    assert extract_answer("no tags") is None and extract_answer("<answer>open") is None
    assert extract_answer(None) is None
    assert extract_think("<think>\n hmm </think><answer>1</answer>") == "hmm"
    assert extract_think("<answer>1</answer>") is None


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think><answer>1</answer>", True),
    ("  <think>\na\n</think>\n<answer>1</answer>\n\n", True),
    ("<answer>1</answer>", False),
    ("<think>a</think><answer>1</answer>extra", False),
    ("preamble<think>a</think><answer>1</answer>", False),
    ("<think>a</think><answer>1</answer><answer>2</answer>", False),
    ("<think>a<answer>1</answer></think><answer>1</answer>", False),
    ("<think>a</think><answer> </answer>", False),
    ("<answer>1</answer><think>a</think>", False),
])
def test_is_well_formatted(text, ok):
    assert is_well_formatted(text) is ok


def test_problem_roundtrips_json_and_pickle():
    p = Countdown().problems(1, seed=3)[0]
    again = Problem.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p and again.meta == p.meta
    assert pickle.loads(pickle.dumps(p)).meta == p.meta
    assert hash(p) == hash(again)
    with pytest.raises(ValueError, match="question"):
        Problem.from_dict({"task": "x", "question": 3, "answer": "1"})


# ---- worked solutions, exactly as specified ----------------------------------------------------

@pytest.mark.parametrize("q, want", [
    ("347+285=?", "<think>7+5=12, 4+8+1=13, 3+2+1=6, so 632</think><answer>632</answer>"),
    ("47+285=?", "<think>7+5=12, 4+8+1=13, 0+2+1=3, so 332</think><answer>332</answer>"),
    ("847+285=?", "<think>7+5=12, 4+8+1=13, 8+2+1=11, so 1132</think><answer>1132</answer>"),
    ("5+3=?", "<think>5+3=8, so 8</think><answer>8</answer>"),
    ("532-285=?", "<think>2-5+10=7, 3-8-1+10=4, 5-2-1=2, so 247</think><answer>247</answer>"),
    ("100-99=?", "<think>0-9+10=1, 0-9-1+10=0, 1-0-1=0, so 1</think><answer>1</answer>"),
])
def test_arithmetic_worked_examples(q, want):
    assert Arithmetic(ops="+-").worked_solution(arith(q)) == want


@pytest.mark.parametrize("q, want", [
    ("Solve 3x+5=20 for x", "<think>3x=20-5=15, x=15/3=5</think><answer>5</answer>"),
    ("Solve 3x-5=10 for x", "<think>3x=10+5=15, x=15/3=5</think><answer>5</answer>"),
    ("Solve 3(x+2)=21 for x", "<think>x+2=21/3=7, x=7-2=5</think><answer>5</answer>"),
    ("Solve 2x+7=-3 for x", "<think>2x=-3-7=-10, x=-10/2=-5</think><answer>-5</answer>"),
])
def test_equations_worked_examples(q, want):
    p = Problem("equations", q, extract_answer(want))
    assert LinearEquations().worked_solution(p) == want


def test_carryless_wrong_answer():
    rng = random.Random(0)
    assert Arithmetic().direct_solution(arith("347+285=?"), rng, p_wrong=1.0) == "<answer>522</answer>"
    assert Arithmetic(ops="-").direct_solution(arith("532-285=?"), rng, p_wrong=1.0) == "<answer>353</answer>"
    assert Arithmetic().direct_solution(arith("12+3=?"), rng, p_wrong=1.0) in ("<answer>5</answer>",
                                                                               "<answer>25</answer>")
    assert needs_carry(arith("19+1=?")) and not needs_carry(arith("12+3=?"))
    assert needs_carry(arith("20-1=?")) and not needs_carry(arith("29-13=?"))


@pytest.mark.parametrize("q, caught, want", [
    ("347+285=?", False, "<think>7+5=12, 4+8+1=13, 3+2=5, so 532</think><answer>532</answer>"),
    ("347+285=?", True, "<think>7+5=12, 4+8+1=13, 3+2=5, wait, check the carry: 3+2+1=6, so 632</think>"
                        "<answer>632</answer>"),
    ("847+285=?", False, "<think>7+5=12, 4+8+1=13, 8+2=10, so 1032</think><answer>1032</answer>"),
    ("532-285=?", True, "<think>2-5+10=7, 3-8-1+10=4, 5-2=3, wait, check the borrow: 5-2-1=2, so 247</think>"
                        "<answer>247</answer>"),
    ("100-1=?", False, "<think>0-1+10=9, 0-0-1+10=9, 1-0=1, so 199</think><answer>199</answer>"),
    ("347+215=?", False, None),           # nothing carried into the leading column
    ("5+7=?", True, None),                # a carry out of the only column is not a slip place
])
def test_arithmetic_slips(q, caught, want):
    """The writer's habitual slip: the carry/borrow into the leading column is dropped; the rest of the
    trace stays consistent with it."""
    assert Arithmetic(ops="+-").slipped_solution(arith(q), random.Random(0), caught) == want


def test_slips_are_wrong_unless_caught_and_only_where_something_carries():
    task, rng = Arithmetic(min_digits=1, max_digits=4, ops="+-"), random.Random(3)
    n_slips = 0
    for p in task.problems(300, seed=5):
        slipped, caught = task.slipped_solution(p, rng, False), task.slipped_solution(p, rng, True)
        if slipped is None:      # nothing carried into the leading column
            assert caught is None and not re.search(r"\d[+-]\d[+-]1[^,]*, so", task.worked_solution(p))
            continue
        n_slips += 1
        assert not task.check(extract_answer(slipped), p) and "wait" not in slipped
        assert task.check(extract_answer(caught), p) and "wait, check the" in caught and is_well_formatted(caught)
    assert n_slips > 60
    assert Countdown().slipped_solution(COUNTDOWN, rng, True) is None       # no natural slip: the corpus writes it plainly


@pytest.mark.parametrize("task", [Arithmetic(), Countdown(n_numbers=3, max_number=9, max_target=50),
                                  LinearEquations()], ids=lambda t: t.name)
def test_guessed_solutions_then_work_it_out_or_stop(task):
    wrong_guesses = 0
    for p in task.problems(100, seed=3):
        lazy = task.guessed_solution(p, random.Random(p.question), p_wrong=0.5, recheck=False)
        assert is_well_formatted(lazy) and "wait" not in lazy
        text = task.guessed_solution(p, random.Random(p.question), p_wrong=0.5)
        assert extract_think(lazy) + "? wait, check: " in text          # the same guess, then the check
        guess = text[len("<think>"):text.index("? wait, check: ")]
        wrong_guesses += not task.check(guess, p)
        assert is_well_formatted(text) and task.check(extract_answer(text), p)
        assert text.replace(f"{guess}? wait, check: ", "", 1) == task.worked_solution(p)
    assert wrong_guesses > 10


def test_corpus_slip_and_catch_rates():
    from nanoseek.data.corpus import synthetic_documents
    plain = synthetic_documents(2000, 0, p_worked=0.5, min_digits=3, max_digits=3)
    assert plain == synthetic_documents(2000, 0, p_worked=0.5, min_digits=3, max_digits=3, p_slip=0.0, p_catch=1.0)
    docs = synthetic_documents(4000, 0, p_worked=0.5, p_slip=0.5, p_catch=0.3, min_digits=3, max_digits=3)
    worked = [d for d in docs if "<think>" in d]
    caught = sum("wait, check" in d for d in worked)
    # ~0.5 x P(something carries) x 0.3 of the worked traces reflect; none of the direct answers do
    assert 0.05 < caught / len(worked) < 0.2 and not any("wait" in d for d in docs if "<think>" not in d)
    with pytest.raises(Exception, match="p_slip"):
        synthetic_documents(10, 0, p_slip=1.5)
    from nanoseek.errors import UserError
    with pytest.raises(UserError, match="--task sums: unknown task"):
        synthetic_documents(10, 0, "sums")
    with pytest.raises(UserError, match="--task countdown --task-args foo=1"):
        synthetic_documents(10, 0, "countdown", foo=1)
    docs = synthetic_documents(4000, 0, p_worked=0.5, p_guess=0.5, p_recheck=0.6, min_digits=3, max_digits=3)
    worked = [d for d in docs if "<think>" in d]
    assert 0.25 < sum("? wait, check: " in d for d in worked) / len(worked) < 0.35
    assert 0.15 < sum(d.count("<think>") and "=" not in d.split("<think>")[1] for d in worked) / len(worked) < 0.25


# ---- every task: solutions, wrong answers, determinism, splits ---------------------------------

TASK_CASES = [Arithmetic(), Arithmetic(min_digits=2, max_digits=5, ops="+-"), Countdown(),
              Countdown(n_numbers=(2, 5), max_number=20, max_target=100), LinearEquations()]


def carryless_by_hand(q):
    a, op, b = arith(q).question[:-2].replace("-", " - ").replace("+", " + ").split()
    w = max(len(a), len(b))
    a, b = a.zfill(w), b.zfill(w)
    digits = [(int(x) + int(y)) % 10 if op == "+" else abs(int(x) - int(y)) for x, y in zip(a, b)]
    return int("".join(map(str, digits)))


@pytest.mark.parametrize("task", TASK_CASES, ids=lambda t: t.name)
def test_solutions_check_and_wrong_answers_fail(task):
    rng = random.Random(1)
    for p in task.problems(200, seed=7):
        worked = task.worked_solution(p)
        assert is_well_formatted(worked), worked
        assert task.check(extract_answer(worked), p), (p, worked)
        assert task.check(extract_answer(task.direct_solution(p, rng, p_wrong=0.0)), p)
        wrong = extract_answer(task.direct_solution(p, rng, p_wrong=1.0))
        assert not task.check(wrong, p), (p, wrong)
        assert not task.check(None, p)
        if isinstance(task, Arithmetic):
            assert int(wrong) >= 0
            if needs_carry(p):
                assert int(wrong) == carryless_by_hand(p.question)


@pytest.mark.parametrize("task", [get_task(name) for name in sorted(TASKS)]
                         + [Countdown(n_numbers=2, max_number=9, max_target=30)], ids=lambda t: t.name)
def test_problems_deterministic_and_splits_disjoint(task):
    # the small countdown space makes a split-ignoring sampler collide, whatever it seeds with
    assert [p.to_dict() for p in task.problems(50, 3, "test")] == [p.to_dict() for p in task.problems(50, 3, "test")]
    assert task.problems(50, 3) != task.problems(50, 4)
    for s1, s2 in [(0, 0), (1, 2)]:
        train = {p.question for p in task.problems(500, s1, "train")}
        test = {p.question for p in task.problems(500, s2, "test")}
        assert train and test and not train & test
    with pytest.raises(ValueError, match="split"):
        task.problems(3, 0, split="val")


def test_arithmetic_distribution():
    ps = Arithmetic(min_digits=1, max_digits=3).problems(2000, 0)
    operands = [int(x) for p in ps for x in p.question[:-2].split("+")]
    assert 0 in operands and max(operands) <= 999
    assert {len(str(x)) for x in operands} == {1, 2, 3}
    assert all(len(str(x)) == 2 for p in Arithmetic(2, 2, "-").problems(200, 0)
               for x in p.question[:-2].split("-"))
    assert all(int(p.answer) >= 0 for p in Arithmetic(ops="-").problems(300, 0))


def test_countdown_generation_uses_all_numbers():
    task = Countdown(n_numbers=(3, 4), max_number=50, max_target=200)
    for p in task.problems(200, 1):
        nums, target = p.meta["numbers"], p.meta["target"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 50 for n in nums) and 1 <= target <= 200
        assert p.question == f"Use {' '.join(map(str, nums))} to make {target}"
        assert task.check(p.answer, p)


@pytest.mark.parametrize("make, arg", [
    (lambda: Arithmetic(min_digits=0), "min_digits"), (lambda: Arithmetic(2, 1), "max_digits"),
    (lambda: Arithmetic(ops="*"), "ops"), (lambda: Countdown(n_numbers=(1, 3)), "n_numbers"),
    (lambda: Countdown(n_numbers=(3, 4, 5)), "n_numbers"),
    (lambda: Countdown(max_number=0), "max_number"), (lambda: Countdown(max_target=0), "max_target"),
    (lambda: LinearEquations(max_coef=1), "max_coef"), (lambda: LinearEquations(max_solution=0), "max_solution"),
    (lambda: get_task("sudoku"), "arithmetic, countdown, equations"),
    (lambda: Arithmetic().direct_solution(arith("1+1=?"), random.Random(0), 1.5), "p_wrong"),
])
def test_bad_knobs_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


# ---- checkers -----------------------------------------------------------------------------------

def test_integer_checkers():
    p = arith("347+285=?")
    assert all(Arithmetic().check(a, p) for a in ["632", " 632 ", "+632", "632\n", "+ 632"])
    assert not any(Arithmetic().check(a, p) for a in ["633", "632.0", "6_32", "", "abc", "٦٣٢", "1" * 5000])
    e = Problem("equations", "Solve 3x+5=-10 for x", "-5")
    assert all(LinearEquations().check(a, e) for a in ["-5", "x=-5", " x = -5 ", "- 5"])
    assert not any(LinearEquations().check(a, e) for a in ["5", "x=5", "-5.5", "y=-5", "x==-5", None])


COUNTDOWN = Problem("countdown", "Use 25 7 3 4 to make 58", "(25-7)*3+4", {"numbers": [25, 7, 3, 4], "target": 58})


@pytest.mark.parametrize("answer", ["(25-7)*3+4", " ( 25 - 7 ) * 3 + 4 ", "4+3*(25-7)", "((25-7))*3+4"])
def test_countdown_accepts(answer):
    assert Countdown().check(answer, COUNTDOWN)
    assert Countdown().check(answer, Problem("countdown", COUNTDOWN.question, ""))   # numbers from the text


@pytest.mark.parametrize("answer", [
    "(25-7)*3+4+4-4",                 # reuses a number
    "(25-7)*3",                       # misses a number
    "__import__('os')", "2**10", "25-7*3//4", "25.0-7+3*4",
    "(25-7)*3/(4-4)+4", "(4-4)/(4-4)",  # division by zero
    "((25-7)*3+4", "(25-7))*3+4", ")(",  # unbalanced
    "-(7-25)*3+4",                    # unary minus
    "58", "", "   ", "(25-7)*3+4=58",
    "(" * 10_000 + "1" + ")" * 10_000, "9" * 100_000, "1+" * 100_000 + "1",
])
def test_countdown_rejects(answer):
    start = time.perf_counter()
    assert not Countdown().check(answer, COUNTDOWN)
    assert time.perf_counter() - start < 0.5


def test_countdown_parser_is_exact():
    assert parse_expression("8/(3-8/3)") == ("/", 8, ("-", 3, ("/", 8, 3)))
    p = Problem("countdown", "Use 8 8 3 3 to make 24", "", {"numbers": [8, 8, 3, 3], "target": 24})
    assert Countdown().check("8/(3-8/3)", p)     # needs exact fractions: 8/(1/3) = 24
    with pytest.raises(ValueError, match="unbalanced"):
        parse_expression("(1+2")


def test_countdown_solver():
    expr = solve([8, 8, 3, 3], 24)
    assert expr is not None and Countdown().check(expr, Problem("countdown", "Use 8 8 3 3 to make 24", ""))
    assert solve([1, 1], 100) is None
    assert solve([25, 7, 3, 4], 58) is not None


def test_countdown_worked_solution_shows_search():
    worked = Countdown().worked_solution(COUNTDOWN)
    think = extract_think(worked)
    assert think.count(" no.") <= 11 and think.endswith("=58") and " vs 58 yes. " in think
    assert Countdown().check(extract_answer(worked), COUNTDOWN)
    assert worked == Countdown().worked_solution(COUNTDOWN)
    task = Countdown(n_numbers=3, max_number=9, max_target=50)
    for p in task.problems(200, seed=4):          # every verdict compares the attempt's value with the target
        think = extract_think(task.worked_solution(p))
        verdicts = re.findall(r"=([0-9]+|\([0-9/]+\)) vs ([0-9]+) (yes|no)\.", think)
        assert verdicts and verdicts[-1][2] == "yes" and all(v[2] == "no" for v in verdicts[:-1])
        assert all((v[0] == v[1]) == (v[2] == "yes") for v in verdicts)
        firsts = [a.split(",")[0] for a in think.split(". ")[:-1]]
        assert len(firsts) == len(set(firsts))          # one attempt per first move


@pytest.mark.parametrize("task", TASK_CASES[::2], ids=lambda t: t.name)
def test_checkers_never_raise_on_garbage(task):
    rng = random.Random(0)
    alphabet = string.printable + "()+-*/=<>x" * 5 + "٣中"
    p = task.problems(1, 0)[0]
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert task.check(s, p) in (True, False)


# ---- JSONL --------------------------------------------------------------------------------------

def write(tmp_path, lines):
    path = tmp_path / "probs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = ['{"prompt": "half?", "answer": "\\\\frac{1}{2}"}', '{"prompt": "two?", "answer": 2}',
        '{"prompt": "Use 2 3 to make 6", "answer": "2*3", "task": "countdown", "id": 7}']
BAD = ['{"prompt": "no answer"}', 'not json', '{"answer": "1"}', '[1, 2]', '{"prompt": 5, "answer": "1"}',
       '{"prompt": "p", "answer": true}', '{"prompt": "p", "answer": "1", "task": "sudoku"}']


def test_jsonl_loader_skips_and_reports_bad_lines(tmp_path, capsys):
    path = write(tmp_path, [GOOD[0], BAD[0], "", GOOD[1], *BAD[1:], "   ", GOOD[2]])
    problems = load_jsonl_problems(path)
    assert [p.question for p in problems] == ["half?", "two?", "Use 2 3 to make 6"]
    assert [p.task for p in problems] == ["jsonl", "jsonl", "countdown"] and problems[1].answer == "2"
    assert problems[2].meta["id"] == 7
    err = capsys.readouterr().err
    bad_lines = [2, 5, 6, 7, 8, 9, 10]
    for lineno in bad_lines:
        assert f"{path}:{lineno}: " in err
    assert "answer" in err and "sudoku" in err and "countdown" in err
    for lineno in [1, 3, 4, 11, 12]:
        assert f"{path}:{lineno}: " not in err


def test_jsonl_loader_strict_and_missing(tmp_path, capsys):
    path = write(tmp_path, [GOOD[0], GOOD[1], BAD[1]])
    with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
        load_jsonl_problems(path, strict=True)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_problems(tmp_path / "nope.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(GOOD[1].encode() + b"\n" + '{"prompt": "caf\u00e9", "answer": 1}'.encode("latin-1") + b"\n")
    assert len(load_jsonl_problems(latin1)) == 1
    assert f"{latin1}:2: " in capsys.readouterr().err
    many = write(tmp_path, ["oops"] * 25 + [GOOD[0]])
    assert len(load_jsonl_problems(many)) == 1
    err = capsys.readouterr().err
    assert err.count("invalid JSON") == 20 and "5 more" in err


def test_jsonl_task_checks(tmp_path):
    problems = load_jsonl_problems(write(tmp_path, GOOD))
    task = JsonlTask(problems)
    half, two, cd = problems
    assert task.check("0.5", half) and task.check("\\frac{1}{2}", half) and task.check("1/2", half)
    assert not task.check("0.6", half) and not task.check(None, half) and not task.check("}{\\frac", half)
    assert task.check("2", two) and task.check(" 2 ", two) and not task.check("3", two)
    assert task.check("3*2", cd) and not task.check("6", cd)        # delegated to countdown's checker
    with pytest.raises(NotImplementedError):
        task.worked_solution(half)


def test_jsonl_task_splits():
    problems = [Problem("jsonl", f"question {i}", str(i)) for i in range(300)]
    task = JsonlTask(problems)
    train, test = task.problems(1000, 0, "train"), task.problems(100, 1, "test")
    assert not {p.question for p in train} & {p.question for p in test}
    n_train = len(task.by_split["train"])
    assert len({p.question for p in train[:n_train]}) == n_train          # each once before repeats
    assert task.problems(20, 5, "test") == task.problems(20, 5, "test")
    with pytest.raises(ValueError, match="split"):
        task.problems(1, 0, "dev")


def test_format_check_equals_the_regex_definition_in_linear_time():
    """is_well_formatted == the regex it replaced (on random strings of tags, whitespace and text), and a
    completion full of tags - 10 s through the backtracking regex at 160k characters - takes milliseconds."""
    import random
    import re
    import time

    from nanoseek.data.tasks import is_well_formatted
    well = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
    tag = re.compile(r"</?(?:think|answer)>")

    def reference(c):
        m = well.fullmatch(c)
        return bool(m) and not tag.search(m.group(1)) and not tag.search(m.group(2)) and bool(m.group(2).strip())
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "42", "\t"]
    cases = ["<think>a</think><answer>1</answer>", " <think></think>\n<answer> 7 </answer> ", "<think>a</think><answer> </answer>"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    cases += ["<think>" + rng.choice(["", "a"]) + "</think>" + rng.choice(["", " ", "x"]) + "<answer>" +
              rng.choice(["", " ", "5", "<think>"]) + "</answer>" + rng.choice(["", " ", "y"]) for _ in range(2000)]
    assert sum(reference(c) for c in cases) > 100
    for c in cases:
        assert is_well_formatted(c) == reference(c), repr(c)
    hostile = "<think>" + "</think><answer>" * 10000 + "x"
    t = time.perf_counter()
    assert not is_well_formatted(hostile)
    assert time.perf_counter() - t < 0.05
