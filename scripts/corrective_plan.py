"""The plan of a corrective expert stage (README, "Training the safety expert").

From a plan of every training request in one context
(``ngsd-guard train-expert --plan-only --save-plan ALL --harmful-contexts 1 --benign-contexts 1``),
keep the project's requests appended after the first stage was trained (harmful items 334 on,
benign items 244 on) and a random replay of the others, all outside the calibration slice::

    python scripts/corrective_plan.py ALL OUT --replay 240

Each request is kept in its first planned context. ``--weight self_harm=3`` keeps every request
of that category outside the calibration slice, each in up to three of its planned contexts: with
a plan made with ``--harmful-contexts 3`` it is trained three times, each time in another one.
``--weighted-only`` keeps the weighted categories and the replay, not the appended requests (a
stage that teaches one category, e.g. self-harm's supportive replies, from the default plan)::

    python scripts/corrective_plan.py PLAN OUT --weight self_harm=4 --weighted-only --replay 260
"""

from __future__ import annotations

import argparse
import json
import random

from ngsd_guard.errors import ConfigError
from ngsd_guard.training.calibrate import is_holdout
from ngsd_guard.training.data import TRAINING_DATA, load_plan, parse_category_counts, save_plan

FIRST_STAGE_ITEMS = {"harmful": 334, "benign": 244}
"""How many items of each project list the first stage's plan drew from."""


def appended_requests() -> set[str]:
    texts = set()
    for label, known in FIRST_STAGE_ITEMS.items():
        rows = json.loads((TRAINING_DATA / f"{label}_requests.json").read_text())["requests"]
        texts |= {row["text"] for row in rows[known:]}
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="every training request in one context (JSONL)")
    parser.add_argument("out", help="the corrective plan (JSONL)")
    parser.add_argument("--replay", type=int, default=240, help="earlier requests kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="CATEGORY=K",
        help="keep this category's requests in up to K contexts (repeatable)",
    )
    parser.add_argument(
        "--weighted-only",
        action="store_true",
        help="keep the --weight categories' requests, not the appended ones",
    )
    args = parser.parse_args()
    try:
        weight = parse_category_counts(args.weight)
    except ConfigError as error:
        raise SystemExit(f"--weight: {error}") from error
    seen: dict[tuple[str, str], int] = {}
    plan = []
    for planned in load_plan(args.plan):
        key = (planned.label, planned.conversation.request)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= weight.get(planned.category, 1) and not is_holdout(key[1]):
            plan.append(planned)
    appended = set() if args.weighted_only else appended_requests()
    new, rest = [], []
    for planned in plan:
        is_new = planned.category in weight or (
            planned.source.startswith("project-") and planned.conversation.request in appended
        )
        (new if is_new else rest).append(planned)
    save_plan(new + random.Random(args.seed).sample(rest, args.replay), args.out)
    kept = "weighted" if args.weighted_only else "appended"
    print(f"wrote {len(new)} {kept} and {args.replay} replayed requests to {args.out}")


if __name__ == "__main__":
    main()
