"""Risk readers side by side: how well each separates harmful from benign requests.

``python -m ngsd_guard.evaluation.readers [--limit N] [--sample-seed S] [--readers
probe,blend,first-step,logprob,json] [--contexts all] [--expert-dir DIR]`` prints, per
reader, the AUC of harmful (advbench-test, xstest-unsafe) vs benign (alpaca, xstest-safe)
requests, per context too, the share of each set read as high risk (above the policy's
threshold), the mean risk per set, and the JSON reader's parse failures. The default model and
the shipped probe are used (``--expert-dir``: the probe and ``policy.json`` of another
directory, e.g. an earlier release, read with the shipped adapter's ``D_0``): ``probe`` alone;
``blend``, the probe blended with the expert's first disagreement ``D_0`` as the shipped
policy reads risk; ``first-step``, ``D_0`` alone (:class:`~ngsd_guard.reflection.FirstStepReader`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..training.command import default_data_dir
from ..training.probe import auc, probe_features
from .sets import load_set

SETS = {"advbench-test": 1, "xstest-unsafe": 1, "alpaca": 0, "xstest-safe": 0}


def compare_readers(
    lm,
    readers: dict,
    data_dir,
    limit: int,
    contexts: Sequence[str] = ("bare",),
    high: float = 6.0,
    seed: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{reader: {"auc": ..., "high_<set>": ..., "mean_<set>": ..., "auc_<context>": ...}}``:
    each set's first ``limit`` requests (``seed``: ``limit`` drawn at random) placed in each
    context; ``high_<set>`` is the share read above ``high``."""
    items = {}
    for name in SETS:
        (bare,) = load_set(name, data_dir, limit=limit, seed=seed)
        for context in contexts:
            items[name, context] = bare.in_context(context).items
    table = {}
    for label, reader in readers.items():
        started = time.perf_counter()
        features = getattr(reader, "features", None)
        risks = {}
        for key, conversations in items.items():
            x = (
                probe_features(lm, conversations, features)
                if features is not None
                else torch.zeros(len(conversations), 0)
            )
            requests = [c.request for c in conversations]
            risks[key] = reader.read(lm, requests, x).float().cpu()
        scores = torch.cat(list(risks.values()))
        labels = torch.cat([torch.full((len(r),), float(SETS[n])) for (n, _), r in risks.items()])
        row = {"auc": round(auc(scores, labels), 3)}
        for name in SETS:
            r = torch.cat([v for (n, _), v in risks.items() if n == name])
            row[f"high_{name}"] = round((r > high).float().mean().item(), 3)
            row[f"mean_{name}"] = round(r.mean().item(), 2)
        if len(contexts) > 1:
            for context in contexts:
                keys = [k for k in risks if k[1] == context]
                ctx_scores = torch.cat([risks[k] for k in keys])
                ctx_labels = torch.cat(
                    [torch.full((len(risks[k]),), float(SETS[k[0]])) for k in keys]
                )
                row[f"auc_{context}"] = round(auc(ctx_scores, ctx_labels), 3)
        if hasattr(reader, "failures"):
            row["parse_failures"] = reader.failures
        row["seconds"] = round(time.perf_counter() - started, 1)
        table[label] = row
    return table


def main(argv: list[str] | None = None) -> int:
    from ..contexts import parse_contexts
    from ..guarded import GuardedLM
    from ..reflection import (
        SHIPPED_PROBE,
        FirstStepReader,
        JsonReader,
        LogprobReader,
        load_probe,
        load_risk_map,
    )

    parser = argparse.ArgumentParser(prog="python -m ngsd_guard.evaluation.readers")
    parser.add_argument("--limit", type=int, default=12, help="prompts per set")
    parser.add_argument(
        "--sample-seed", type=int, default=None, help="draw --limit at random, not the first"
    )
    parser.add_argument("--readers", default="probe,blend,logprob,json")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--contexts", default="bare", help="contexts to read in, or 'all'")
    parser.add_argument(
        "--expert-dir", type=Path, default=SHIPPED_PROBE.parent, help="probe and policy.json"
    )
    args = parser.parse_args(argv)
    probe_path = args.expert_dir / SHIPPED_PROBE.name
    makers = {
        "probe": lambda: load_probe(probe_path, blend=False),
        "blend": lambda: load_probe(probe_path),
        "first-step": FirstStepReader,
        "logprob": LogprobReader,
        "json": JsonReader,
    }
    readers = {name: makers[name]() for name in args.readers.split(",") if name}
    lm = GuardedLM.from_default()
    contexts = parse_contexts(args.contexts)
    data_dir = args.data_dir or default_data_dir()
    high = load_risk_map(args.expert_dir).high
    table = compare_readers(
        lm, readers, data_dir, args.limit, contexts, high=high, seed=args.sample_seed
    )
    for name, row in table.items():
        print(name, json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
