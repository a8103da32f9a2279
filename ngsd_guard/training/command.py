"""``ngsd-guard train-expert``: build the data, train the probe and the LoRA expert."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..guarded import GuardedLM
    from .data import BuildConfig, PlannedRequest


def default_data_dir() -> Path:
    """``$NGSD_GUARD_DATA``, else ``../shared/data`` from the working directory."""
    return Path(os.environ.get("NGSD_GUARD_DATA", "../shared/data"))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-expert",
        help="train a LoRA safety expert and a hidden-state risk probe",
        description=(
            "Builds the training data with the base model itself (refusals under a safety "
            "prompt, deep-alignment recovery prefixes, benign anchors distilled from the base), "
            "trains a LoRA adapter and a hidden-state probe, and writes a peft adapter dir, "
            "probe.safetensors and training.json to --out."
        ),
    )
    parser.add_argument("--model", help="base model dir or cached hub id (default: embedded)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--out", type=Path, default=Path("runs/expert"), help="output directory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benign-limit", type=int, default=400, help="AlpacaEval anchors (100+)")
    parser.add_argument("--harmful-limit", type=int, default=None, help="cap harmful seeds")
    _add_context_options(parser, per_request=2)
    parser.add_argument(
        "--save-plan", type=Path, help="write the planned requests in their contexts (JSONL)"
    )
    parser.add_argument(
        "--plan",
        type=Path,
        help="read planned requests from a --save-plan file instead of planning (a machine "
        "without the framework packages can train from a plan made elsewhere)",
    )
    parser.add_argument(
        "--plan-only", action="store_true", help="stop after --save-plan (no model is loaded)"
    )
    parser.add_argument("--refusal-tries", type=int, default=4)
    parser.add_argument("--recovery-rate", type=float, default=0.5)
    parser.add_argument("--answer-tokens", type=int, default=64, help="length of base answers")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=64)
    parser.add_argument(
        "--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated"
    )
    parser.add_argument(
        "--first-layer",
        type=int,
        default=0,
        help="adapt the decoder layers from this one on (counted from 0): the expert's lower "
        "layers stay the base's, and its verifications run its own layers only",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="LoRA training batch")
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="longest training sequence in tokens (longer examples are dropped; agent-react "
        "prompts run past 1024)",
    )
    parser.add_argument(
        "--generate-batch-size", type=int, default=32, help="batch of the base's own answers"
    )
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--no-probe", action="store_true", help="skip the risk probe")
    parser.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip choosing the alpha escalation on held-out training requests",
    )
    parser.add_argument(
        "--probe-features",
        default="last@30+mean@18",
        help="what the probe reads from the prefill: POOL@LAYER terms joined by + (last: the "
        "last prompt token; mean: the last user message), layers counted from 1 (the default "
        "suits SmolLM2-135M's 30 layers)",
    )
    parser.add_argument("--save-examples", type=Path, help="write the examples as JSONL here")
    parser.add_argument(
        "--examples",
        type=Path,
        help="train on the examples of a --save-examples file instead of building them (the "
        "base's answers); --plan still names the held-out requests",
    )
    parser.add_argument(
        "--init-adapter",
        type=Path,
        help="go on training this expert's adapter instead of a fresh one (its rank and "
        "targets; with --no-probe its probe and policy.json are kept)",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        help="an expert adapter dir to distil the harmful examples from (its whole "
        "distribution) instead of training them on the written refusals; the benign ones stay "
        "distilled from the base",
    )
    parser.add_argument(
        "--written-categories",
        default="self_harm",
        metavar="CATEGORY,...",
        help="with --teacher, harmful categories still trained on their written answers "
        "(self-harm's supportive replies point to help; '' for none)",
    )
    parser.add_argument(
        "--teach-benign",
        action="store_true",
        help="with --teacher, distil the benign examples from the teacher too instead of the "
        "base: the student copies the teacher everywhere (e.g. onto --first-layer)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="LoRA forwards under bf16 autocast (CPU or CUDA)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="save the LoRA training's state in this directory every --checkpoint-every steps, "
        "and go on from it when it holds one (a run killed midway resumes where it was)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between saves")
    parser.add_argument("--json", action="store_true", help="print training.json")
    parser.set_defaults(handler=cmd_train_expert)
    _add_calibrate_parser(subparsers)
    _add_probe_parser(subparsers)
    return parser


def _add_probe_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-probe",
        help="refit an expert's risk probe (and recalibrate), keeping its adapter",
        description=(
            "Plans the training requests in their contexts, reads the base's prompt features, "
            "fits the hidden-state risk probe on every request outside the calibration slice, "
            "writes probe.safetensors into --expert-dir, then chooses the blend and risk map "
            "on the held-out slice as calibrate-expert does. Needs no LoRA training, so a CPU "
            "is enough (about an hour for 6500 planned requests on 2 cores)."
        ),
    )
    _add_expert_dir_options(parser)
    parser.add_argument("--benign-limit", type=int, default=400, help="AlpacaEval anchors (100+)")
    _add_context_options(parser, per_request=3)
    parser.add_argument("--probe-features", default="last@30+mean@18", help="as for train-expert")
    parser.add_argument("--no-calibrate", action="store_true", help="only refit the probe")
    parser.set_defaults(handler=cmd_train_probe)


def _add_expert_dir_options(parser: argparse.ArgumentParser) -> None:
    """What ``calibrate-expert`` and ``train-probe`` share: the expert, the plan, the budgets."""
    parser.add_argument("--expert-dir", type=Path, required=True, help="adapter dir with probe")
    parser.add_argument("--model", help="base model dir or cached hub id (default: embedded)")
    parser.add_argument("--plan", type=Path, help="the training plan (default: planned anew)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-benign-high", type=float, default=0.01)
    parser.add_argument("--max-benign-escalated", type=float, default=0.05)
    parser.add_argument(
        "--no-blend", action="store_true", help="read risk by the probe alone (no tv@0)"
    )


def _add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate-expert",
        help="choose an expert's risk thresholds and alpha escalation on held-out requests",
        description=(
            "Reads the held-out slice of the training plan (the probe's log-odds and the "
            "expert's first disagreement D_0), fits their blend, decodes the requests read as "
            "low risk at alpha 0, counts the expert's dissents, and writes the chosen blend and "
            "risk map to the expert's policy.json (what train-expert does last)."
        ),
    )
    _add_expert_dir_options(parser)
    parser.set_defaults(handler=cmd_calibrate_expert)


def cmd_calibrate_expert(args: argparse.Namespace) -> int:
    from ..guarded import GuardedLM
    from ..loading import default_model_dir
    from .calibrate import split_holdout
    from .data import BuildConfig

    plan = _read_plan(args, BuildConfig(seed=args.seed))
    _, holdout = split_holdout(plan)
    lm = GuardedLM.from_pretrained(
        args.model or default_model_dir(), adapter=args.expert_dir, device=args.device
    )
    print(json.dumps(_calibrate_into(lm, args, holdout), indent=2))
    return 0


def _calibrate_into(
    lm: GuardedLM, args: argparse.Namespace, holdout: list[PlannedRequest]
) -> dict[str, object]:
    """Calibrate ``--expert-dir``'s probe on ``holdout`` under the command's budgets, write its
    ``policy.json``, and return the summary."""
    from ..reflection import ProbeReader
    from .calibrate import calibrate
    from .expert import PROBE_FILE

    result = calibrate(
        lm,
        ProbeReader.load(args.expert_dir / PROBE_FILE),
        holdout,
        batch_size=args.batch_size,
        max_benign_high=args.max_benign_high,
        max_benign_escalated=args.max_benign_escalated,
        blend=not args.no_blend,
    )
    result.save(args.expert_dir)
    return result.summary()


def _add_context_options(parser: argparse.ArgumentParser, *, per_request: int) -> None:
    """How many contexts each planned request is drawn in."""
    for label in ("harmful", "benign"):
        parser.add_argument(
            f"--{label}-contexts",
            type=int,
            default=per_request,
            help=f"contexts drawn per {label} request",
        )
    parser.add_argument(
        "--category-contexts",
        type=_category_contexts,
        metavar="CATEGORY=K,...",
        help="harmful categories drawn in K contexts per request instead of --harmful-contexts "
        "(default: data.CATEGORY_CONTEXTS, self_harm=4; '' for none)",
    )


def _category_contexts(text: str) -> dict[str, int]:
    """``"self_harm=4,weapons=3"`` -> ``{"self_harm": 4, "weapons": 3}`` ('' -> none)."""
    from .data import parse_category_counts

    try:
        return parse_category_counts([part for part in text.split(",") if part.strip()])
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _categories(args: argparse.Namespace) -> dict[str, int]:
    """``--category-contexts``, or the default ones."""
    from .data import CATEGORY_CONTEXTS

    return dict(CATEGORY_CONTEXTS) if args.category_contexts is None else args.category_contexts


def _read_plan(args: argparse.Namespace, build: BuildConfig) -> list[PlannedRequest]:
    """``--plan`` if given, else the training requests planned anew under ``build``."""
    from .data import load_plan, load_seeds, plan_requests

    if args.plan is not None:
        return load_plan(args.plan)
    seeds = load_seeds(
        args.data_dir or default_data_dir(),
        benign_limit=getattr(args, "benign_limit", 400),
        harmful_limit=getattr(args, "harmful_limit", None),
    )
    return plan_requests(seeds, build)


def cmd_train_probe(args: argparse.Namespace) -> int:
    from ..features import PromptFeatures
    from ..guarded import GuardedLM
    from ..loading import DEFAULT_MODEL_NAME, default_model_dir
    from .calibrate import split_holdout
    from .data import BuildConfig
    from .expert import RECORD_FILE, train_probe
    from .trainer import require_adapter

    require_adapter(args.expert_dir, "--expert-dir")
    build = BuildConfig(
        seed=args.seed,
        harmful_contexts=args.harmful_contexts,
        benign_contexts=args.benign_contexts,
        category_contexts=_categories(args),
    )
    plan = _read_plan(args, build)
    train, holdout = split_holdout(plan)
    lm = GuardedLM.from_pretrained(
        args.model or default_model_dir(), adapter=args.expert_dir, device=args.device
    )
    probe = train_probe(
        lm,
        train,
        PromptFeatures.parse(args.probe_features),
        args.expert_dir,
        base_name=Path(str(args.model)).name if args.model else DEFAULT_MODEL_NAME,
        batch_size=args.batch_size,
    )
    probe["command"] = "ngsd-guard " + shlex.join(sys.argv[1:])
    probe["planned_requests"] = len(plan)
    if args.plan is None:  # a plan file records its own draws
        probe["contexts_per_request"] = {
            "harmful": args.harmful_contexts,
            "benign": args.benign_contexts,
            "by_category": build.category_contexts,
        }
    else:
        probe["plan"] = str(args.plan)
    record_path = args.expert_dir / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["probe"] = probe
    if not args.no_calibrate:
        record["calibration"] = _calibrate_into(lm, args, holdout)
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps({"probe": probe, "calibration": record.get("calibration")}, indent=2))
    return 0


def cmd_train_expert(args: argparse.Namespace) -> int:
    import torch

    from ..features import PromptFeatures
    from ..loading import (
        DEFAULT_MODEL_NAME,
        default_model_dir,
        load_model,
        load_tokenizer,
        resolve,
        resolve_device,
    )
    from .data import BuildConfig, load_examples, save_plan
    from .expert import train_expert
    from .trainer import Checkpoint, LoraSettings, require_adapter

    data_dir = args.data_dir or default_data_dir()
    if args.plan is None and not (data_dir / "advbench_harmful_behaviors.json").is_file():
        raise ConfigError(
            f"`--data-dir` (={str(data_dir)!r}) has no advbench_harmful_behaviors.json; "
            "point it at shared/data"
        )
    build = BuildConfig(
        seed=args.seed,
        refusal_tries=args.refusal_tries,
        recovery_rate=args.recovery_rate,
        compliant_tokens=args.answer_tokens,
        benign_tokens=args.answer_tokens,
        harmful_contexts=args.harmful_contexts,
        benign_contexts=args.benign_contexts,
        category_contexts=_categories(args),
        batch_size=args.generate_batch_size,
    )
    lora = LoraSettings(
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules=tuple(m for m in args.target_modules.split(",") if m),
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        distill_weight=args.distill_weight,
        seed=args.seed,
        bf16=args.bf16,
        first_layer=args.first_layer,
        teacher=None if args.teacher is None else str(args.teacher),
        written_categories=tuple(
            c.strip() for c in args.written_categories.split(",") if c.strip()
        ),
        teach_benign=args.teach_benign,
    )
    checkpoint = (
        None if args.checkpoint is None else Checkpoint(args.checkpoint, args.checkpoint_every)
    )
    if args.init_adapter is not None:
        require_adapter(args.init_adapter, "--init-adapter")
    if args.teacher is not None:
        require_adapter(args.teacher, "--teacher")
    plan = _read_plan(args, build)
    if args.save_plan is not None:
        save_plan(plan, args.save_plan)
        print(f"wrote {len(plan)} planned requests to {args.save_plan}")
    if args.plan_only:
        if args.save_plan is None:
            raise ConfigError("`--plan-only` needs `--save-plan PATH`")
        return 0
    device = resolve_device(args.device)
    path = resolve(args.model) if args.model else default_model_dir()
    base_name = Path(str(args.model)).name if args.model else DEFAULT_MODEL_NAME
    tokenizer = load_tokenizer(path, gguf_file=args.gguf_file)
    model = load_model(path, device=device, dtype=torch.float32, gguf_file=args.gguf_file)
    record = train_expert(
        model,
        tokenizer,
        plan=plan,
        out=args.out,
        base_name=base_name,
        build=build,
        lora=lora,
        probe=None if args.no_probe else PromptFeatures.parse(args.probe_features),
        calibrate=not args.no_calibrate,
        examples_path=args.save_examples,
        examples=None if args.examples is None else load_examples(args.examples, tokenizer),
        init_adapter=args.init_adapter,
        checkpoint=checkpoint,
        command="ngsd-guard " + shlex.join(sys.argv[1:]),
    )
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        training = record["training"]
        print(
            f"wrote {args.out}: {training['steps']} steps in {training['seconds']} s, "
            f"loss {training['first_loss']} -> {training['last_loss']}"
            + (f", probe AUC {record['probe']['cv_auc']}" if "probe" in record else "")
        )
    return 0
