"""``ngsd-guard eval``: base alone vs guarded on named sets; a table, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..contexts import CONTEXTS, EVAL_CONTEXTS
from ..training.command import default_data_dir
from .sets import NAMED_SETS

POLICIES = ("default", "fixed", "probe", "first-step", "reflect-json", "reflect-logprob")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cli import add_model_options

    parser = subparsers.add_parser(
        "eval",
        help="base alone vs guarded: refusals, ASR, identical outputs, spikes, speed",
        description="Runs base alone and guarded on each set in each context and prints a "
        "table (or --json), one row per set x context. Sets: "
        + ", ".join(NAMED_SETS)
        + ', or a JSONL file of {"prompt" or "messages", "tools"?, "label"} lines. Contexts: '
        + ", ".join(CONTEXTS)
        + " (see ngsd_guard.contexts).",
    )
    parser.add_argument(
        "--sets",
        default=",".join(NAMED_SETS),
        help="comma-separated set names; NAME:N takes the first N prompts of that set",
    )
    parser.add_argument(
        "--contexts",
        default="bare",
        help="comma-separated contexts to place every request in, or 'all' ("
        + ", ".join(EVAL_CONTEXTS)
        + ")",
    )
    parser.add_argument("--context-seed", type=int, default=0, help="seed of the context variants")
    parser.add_argument(
        "--export-sets",
        type=Path,
        help="write the sets, placed in their contexts, to this JSONL file and exit (no model)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    parser.add_argument(
        "--sample-seed",
        type=int,
        default=None,
        help="with --limit (or NAME:N), draw N prompts at random with this seed, not the first",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output", type=Path, help="results JSON (default: runs/eval/<time>.json)")
    parser.add_argument("--early-stop-after", type=int, default=None)
    policy = parser.add_argument_group("alpha policy")
    policy.add_argument(
        "--alpha-policy",
        choices=POLICIES,
        default="default",
        help="default: the probe when the expert has one, else fixed; fixed uses --alpha; "
        "first-step reads risk as 10 D_0, the expert's first disagreement alone",
    )
    policy.add_argument("--probe", type=Path, help="probe.safetensors (default: the expert's)")
    policy.add_argument(
        "--no-blend",
        action="store_true",
        help="read risk by the probe alone, not blended with the expert's D_0 as policy.json says",
    )
    policy.add_argument("--risk-high", type=float, default=None)
    policy.add_argument("--risk-low", type=float, default=None)
    policy.add_argument("--alpha-high", type=float, default=None)
    policy.add_argument("--alpha-mid", type=float, default=None)
    policy.add_argument("--alpha-low", type=float, default=None)
    policy.add_argument("--prime", type=float, default=None, help="initial potential, high risk")
    policy.add_argument(
        "--escalate-after",
        type=int,
        default=None,
        help="dissenting spikes before alpha rises (0: never; default: the expert's policy)",
    )
    policy.add_argument("--escalated-alpha", type=float, default=None)
    add_model_options(parser)
    parser.set_defaults(handler=cmd_eval, max_new_tokens=64)
    return parser


def build_policy(args: argparse.Namespace):
    """The AlphaPolicy named by the flags, or None to keep the model's own."""
    from ..alpha import FixedAlpha
    from ..reflection import (
        SHIPPED_PROBE,
        FirstStepReader,
        JsonReader,
        LogprobReader,
        ReflectionAlpha,
        load_probe,
        load_risk_map,
    )

    name = args.alpha_policy
    probe = args.probe
    if probe is None:
        adapter_probe = Path(args.adapter) / "probe.safetensors" if args.adapter else None
        if adapter_probe is not None and adapter_probe.is_file():
            probe = adapter_probe
        else:  # the shipped probe reads the default model's hidden states only
            probe = SHIPPED_PROBE if args.model is None else Path("no-probe-for-this-model")
    if name == "default":
        name = "probe" if probe.is_file() and not args.prompted and args.alpha is None else "fixed"
    if name == "fixed":
        return FixedAlpha(args.alpha if args.alpha is not None else 0.9)
    updates = {
        key: value
        for key, value in {
            "high": args.risk_high,
            "low": args.risk_low,
            "alpha_high": args.alpha_high,
            "alpha_mid": args.alpha_mid,
            "alpha_low": args.alpha_low,
            "potential_high": args.prime,
            "escalated_alpha": args.escalated_alpha,
        }.items()
        if value is not None
    }
    if args.escalate_after is not None:
        updates["escalate_after"] = args.escalate_after or None
    risk_map = load_risk_map(probe.parent).model_copy(update=updates)
    risk_map = type(risk_map)(**risk_map.model_dump())  # re-validate
    reader = {
        "probe": lambda: load_probe(probe, blend=not args.no_blend),
        "first-step": FirstStepReader,
        "reflect-json": JsonReader,
        "reflect-logprob": LogprobReader,
    }[name]()
    return ReflectionAlpha(reader, risk_map)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..cli import load_from_args
    from ..contexts import parse_contexts
    from .runner import evaluate_set, format_summary, format_table
    from .sets import export_jsonl, load_set

    data_dir = args.data_dir or default_data_dir()
    contexts = parse_contexts(args.contexts)
    sets = []
    for item in filter(None, args.sets.split(",")):
        name, _, count = item.partition(":") if not item.endswith(".jsonl") else (item, "", "")
        limit = int(count) if count else args.limit
        for bare in load_set(name, data_dir, limit=limit, seed=args.sample_seed):
            if bare.context != "bare":  # an exported file: already in its contexts
                sets.append(bare)
                continue
            sets += [bare.in_context(c, seed=args.context_seed) for c in contexts]
    if args.export_sets is not None:
        count = export_jsonl(sets, args.export_sets)
        print(f"wrote {count} requests in {len(sets)} set x context groups to {args.export_sets}")
        return 0
    lm = load_from_args(args)
    lm.alpha_policy = build_policy(args)
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for eval_set in sets:
        entry, set_rows = evaluate_set(
            lm,
            eval_set,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            early_stop_after=args.early_stop_after,
        )
        results.append(entry)
        rows += set_rows
    output = args.output or Path("runs/eval") / time.strftime("%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "results": results,
        "command": "ngsd-guard " + shlex.join(sys.argv[1:]),
        "model": lm.model_name,
        "expert_kind": lm.expert_kind,
        "expert_first_layer": lm.expert_first_layer,
        "expert_cache_dtype": lm.config.expert_cache_dtype,
        "alpha_policy": type(lm.alpha_policy).__name__,
        "device": str(lm.device),
        "outputs": rows,
    }
    output.write_text(json.dumps(record, indent=1) + "\n")
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    else:
        print(format_table(results))
        print("\nPooled by context and label:\n")
        print(format_summary(results))
        print(f"\nresults: {output}")
    return 0
