"""Write the bundled lm-eval tasks' data (evals/lm_eval/*.jsonl) from code with a fixed seed.

The task YAMLs next to them are written by hand. Run `python scripts/make_eval_tasks.py` to regenerate, or
`--check` to verify the committed files are this script's output (a test does that). Standard library only.

Tasks (each 200 documents; the recipe's `eval.lm_eval.limit` takes the first N):
- qp_arith: the sum of two digits 1-9 (multiple choice of 4: the sum and near misses).
- qp_order: the largest of three different numbers (multiple choice of the 3 numbers as given).
- qp_sequence: the next item of a well-known sequence (weekdays, months, letters, counting; 4 choices).
- qp_copy: repeat 3-5 common words exactly (generated until a newline; exact match).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "evals" / "lm_eval"
N_DOCS = 200
SEED = 1234

WORDS = ("apple bird blue book bread chair cloud cold dog door fish flower green hand happy house lamp milk moon "
         "music paper rain red river road salt ship small snow star stone sun table tree warm water white wind "
         "window winter yellow").split()
SEQUENCES = {
    "weekday": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "month": ("January February March April May June July August September October November "
              "December").split(),
    "letter": list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "number": [str(i) for i in range(1, 41)],
    "even number": [str(i) for i in range(2, 81, 2)],
}


def arith(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    right = a + b
    wrong = sorted({right + d for d in (-2, -1, 1, 2, 10) if right + d > 0})
    choices = [right, *rng.sample(wrong, 3)]
    rng.shuffle(choices)
    return {"question": f"What is {a} plus {b}?", "choices": [str(c) for c in choices],
            "label": choices.index(right)}


def order(rng: random.Random) -> dict:
    nums = rng.sample(range(1, 100), 3)
    return {"question": f"Which number is the largest: {nums[0]}, {nums[1]} or {nums[2]}?",
            "choices": [str(n) for n in nums], "label": nums.index(max(nums))}


def sequence(rng: random.Random) -> dict:
    kind = rng.choice(sorted(SEQUENCES))
    items = SEQUENCES[kind]
    start = rng.randint(0, len(items) - 4)
    shown, right = items[start:start + 3], items[start + 3]
    wrong = rng.sample([x for x in items if x != right and x not in shown], 3)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": f"Continue the sequence: {', '.join(shown)},", "choices": choices,
            "label": choices.index(right), "kind": kind}


def copy(rng: random.Random) -> dict:
    words = " ".join(rng.sample(WORDS, rng.randint(3, 5)))
    return {"words": words, "answer": words}


TASKS = {"qp_arith": arith, "qp_order": order, "qp_sequence": sequence, "qp_copy": copy}


def render(name: str) -> str:
    rng = random.Random(f"{SEED}-{name}")
    make = TASKS[name]
    return "".join(json.dumps(make(rng), sort_keys=True) + "\n" for _ in range(N_DOCS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from the output")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    stale = []
    for name in TASKS:
        path = args.out / f"{name}.jsonl"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale (run scripts/make_eval_tasks.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
