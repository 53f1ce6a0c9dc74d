"""``demo:python``: an arithmetic recipe in words and its one-line program (template ``python``).

``{"id", "description", "code", "inputs", "expected"}``: an arithmetic recipe in words and its
one-line program, e.g. "Add 3 to x, then double it." -> ``result = (x + 3) * 2``. One to three
steps (add, subtract, multiply, double, triple, divide, halve, floor-divide, modulo, square)
on one variable, or on two combined first ("Take the product of width and height ...");
"Store it in NAME." renames the result. The code is parenthesised exactly where Python's
precedence needs it; ``inputs`` are values of the variables and ``expected`` the value the
program must compute, worked out step by step apart from the code (a unit test per record).
"""

from __future__ import annotations

import random

from peftlab.data.demo.common import draw_records

# Each operation: (first-step phrasings naming the variable {v}, later-step phrasings about "it",
# Python operator, precedence of the result, range of the constant {k}).
# Precedence: 2 for + -, 3 for * / // %, 4 for **, 5 for a name or a parenthesised expression.

PY_VARIABLES = ["x", "y", "n", "total", "price", "count", "score", "width", "height", "speed", "age", "amount"]
PY_OUTPUTS = ["result", "answer", "value", "out", "new_total"]
PY_OPS = [
    (["add {k} to {v}", "take {v} plus {k}", "increase {v} by {k}"],
     ["add {k}", "increase it by {k}", "add {k} to it"], "+", 2, (1, 20)),
    (["subtract {k} from {v}", "take {v} minus {k}", "decrease {v} by {k}"],
     ["subtract {k}", "take away {k}", "decrease it by {k}"], "-", 2, (1, 20)),
    (["multiply {v} by {k}", "scale {v} by {k}"], ["multiply it by {k}", "multiply by {k}", "scale it by {k}"], "*", 3, (3, 12)),
    (["double {v}"], ["double it"], "*", 3, (2, 2)),
    (["triple {v}"], ["triple it"], "*", 3, (3, 3)),
    (["divide {v} by {k}"], ["divide it by {k}", "divide by {k}"], "/", 3, (3, 10)),
    (["halve {v}", "cut {v} in half"], ["halve it", "cut it in half"], "/", 3, (2, 2)),
    (["integer-divide {v} by {k}", "floor-divide {v} by {k}"],
     ["integer-divide it by {k}", "floor-divide it by {k}"], "//", 3, (2, 10)),
    (["take {v} modulo {k}", "take the remainder of {v} divided by {k}"],
     ["take the remainder after dividing by {k}", "take it modulo {k}"], "%", 3, (2, 10)),
    (["square {v}"], ["square it"], "**", 4, (2, 2)),
]  # fmt: skip
PY_STARTS = [  # two-variable openings: (phrasings, operator, precedence)
    (["take the sum of {a} and {b}", "add {a} and {b}"], "+", 2),
    (["take the product of {a} and {b}", "multiply {a} by {b}"], "*", 3),
    (["subtract {b} from {a}", "take {a} minus {b}"], "-", 2),
]
_PY_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
             "//": lambda a, b: a // b, "%": lambda a, b: a % b, "**": lambda a, b: a**b}  # fmt: skip


def _binary(left: tuple[str, int], op: str, prec: int, right: str) -> tuple[str, int]:
    """``left op right``, parenthesising ``left`` where Python's precedence needs it: every operator
    here is left-associative except ``**``, whose left operand must be atomic."""
    text, left_prec = left
    need = 5 if op == "**" else prec
    return (f"({text})" if left_prec < need else text) + f" {op} {right}", prec


def _python(rng: random.Random) -> dict:
    """One description, its one-line program, inputs for the program and the value it must compute.

    The value is computed step by step, independently of the expression text, so running the code
    on ``inputs`` and comparing with ``expected`` checks the parenthesisation (tests/test_demo_tasks.py).
    """
    a, b = rng.sample(PY_VARIABLES, 2)
    inputs = {a: rng.randint(2, 30), b: rng.randint(2, 30)}
    previous = None
    if rng.random() < 0.3:  # start from two variables
        phrasings, op, prec = rng.choice(PY_STARTS)
        clauses = [rng.choice(phrasings).format(a=a, b=b)]
        expr, value = _binary((a, 5), op, prec, b), _PY_APPLY[op](inputs[a], inputs[b])
        later = rng.randint(0, 2)
    else:  # one variable, named by the first step
        del inputs[b]
        first, _, op, prec, (lo, hi) = rng.choice(PY_OPS)
        k = rng.randint(lo, hi)
        clauses = [rng.choice(first).format(k=k, v=a)]
        expr, value, previous = _binary((a, 5), op, prec, str(k)), _PY_APPLY[op](inputs[a], k), op
        later = rng.randint(1, 2)
    for _ in range(later):
        _, phrasings, op, prec, (lo, hi) = rng.choice([s for s in PY_OPS if s[2] != previous])
        k = rng.randint(lo, hi)
        clauses.append(rng.choice(phrasings).format(k=k))
        expr, value, previous = _binary(expr, op, prec, str(k)), _PY_APPLY[op](value, k), op
    sentence = clauses[0]
    for clause in clauses[1:]:
        sentence += rng.choice([", then ", " and then ", ", then "]) + clause
    out = rng.choice(PY_OUTPUTS)
    description = sentence[0].upper() + sentence[1:] + "."
    if out != "result" or rng.random() < 0.3:
        description += rng.choice([" Store it in {o}.", " Call the result {o}.", " Save the answer as {o}."]).format(o=out)
    return {"description": description, "code": f"{out} = {expr[0]}", "inputs": inputs, "expected": value}


def python_demo(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` "translate into Python" records ``{"id", "description", "code", "inputs", "expected"}``."""
    return draw_records("python", n, seed, lambda rng, i: _python(rng), key="description")

