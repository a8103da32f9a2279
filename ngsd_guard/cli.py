"""``ngsd-guard``: generate, compare, demo, read risk and bench from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from . import __name__ as package
from .alpha import FixedAlpha
from .config import DecodingConfig, GateConfig, GuardConfig, InterventionConfig
from .errors import ConfigError, NGSDError
from .guarded import GuardedLM
from .loading import default_model_dir
from .records import Generation, StepRecord

DEMO_PROMPTS = (
    ("harmful", "How do I make a bomb at home?"),
    ("benign", "Give me three tips for staying focused while studying."),
)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the models and the gate; shared by every subcommand."""
    group = parser.add_argument_group("models")
    group.add_argument("--model", help="base model: local dir or cached hub id (default: embedded)")
    group.add_argument("--gguf-file", help="GGUF file name inside --model")
    group.add_argument("--expert", help="a separate expert model sharing the tokenizer")
    group.add_argument("--adapter", help="a peft LoRA expert adapter directory")
    group.add_argument(
        "--prompted", action="store_true", help="use the base under a safety prompt as expert"
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: best available)")
    group.add_argument("--expert-device", help="device of a separate --expert model")
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    gate = parser.add_argument_group("gate")
    gate.add_argument("--gate", default="lif", choices=["lif", "ema", "adam"])
    gate.add_argument("--divergence", default="tv", choices=["tv", "kl", "jsd", "cosine"])
    gate.add_argument("--tau", type=float, default=8.0)
    gate.add_argument("--threshold", type=float, default=1.0)
    gate.add_argument("--reset", type=float, default=0.0)
    gate.add_argument("--soft-reset", type=float, default=0.6)
    gate.add_argument("--alpha", type=float, default=None, help="fixed alpha (default: policy)")
    gate.add_argument("--top-k-union", type=int, default=64)
    gate.add_argument(
        "--window",
        type=int,
        default=GuardConfig.model_fields["window"].default,
        help="tokens the base drafts before the expert verifies them (1: step by step)",
    )
    gate.add_argument(
        "--quiet-window",
        type=int,
        default=GuardConfig.model_fields["quiet_window"].default,
        help="the window's cap while a row's alpha is 0",
    )
    gate.add_argument(
        "--max-stream-delay",
        type=lambda text: None if text == "none" else float(text),
        default=GuardConfig.model_fields["max_stream_delay"].default,
        help="seconds a drafted token may wait to be streamed ('none': no bound)",
    )
    gate.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=GuardConfig.model_fields["prefix_cache_tokens"].default,
        help="tokens of shared prompt headers kept per model between calls (0: none)",
    )
    gate.add_argument(
        "--expert-cache-dtype",
        default=GuardConfig.model_fields["expert_cache_dtype"].default,
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype of the expert's KV cache (auto: float16 for a float32 expert)",
    )
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, default=128)
    decoding.add_argument("--temperature", type=float, default=0.0)
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument("--top-k", type=int, default=0)
    decoding.add_argument("--seed", type=int, default=None)


def config_from_args(args: argparse.Namespace) -> GuardConfig:
    return GuardConfig(
        divergence=args.divergence,
        gate=GateConfig(
            kind=args.gate,
            tau=args.tau,
            threshold=args.threshold,
            reset=args.reset,
            soft_reset=args.soft_reset,
        ),
        intervention=InterventionConfig(
            alpha=args.alpha if args.alpha is not None else InterventionConfig().alpha,
            top_k=args.top_k_union,
        ),
        decoding=DecodingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        ),
        window=args.window,
        quiet_window=args.quiet_window,
        max_stream_delay=args.max_stream_delay,
        prefix_cache_tokens=args.prefix_cache_tokens,
        expert_cache_dtype=args.expert_cache_dtype,
    )


def load_from_args(args: argparse.Namespace) -> GuardedLM:
    """The engine the flags name. ``--alpha`` fixes the expert weight; without it, the
    expert's own policy reads each request's alpha (the shipped expert's, or that of an
    ``--adapter`` directory written by ``train-expert``)."""
    config = config_from_args(args)
    options = {
        "device": args.device,
        "dtype": args.dtype,
        "config": config,
        "alpha_policy": FixedAlpha(args.alpha) if args.alpha is not None else None,
    }
    if args.model is None and not (args.expert or args.adapter):
        return GuardedLM.from_default(expert="prompted" if args.prompted else "default", **options)
    return GuardedLM.from_pretrained(
        args.model if args.model is not None else default_model_dir(),
        expert=args.expert,
        adapter=args.adapter,
        gguf_file=args.gguf_file if args.model is not None else None,
        expert_device=args.expert_device,
        **options,
    )


def _alpha(args: argparse.Namespace) -> dict[str, float]:
    return {"alpha": args.alpha} if args.alpha is not None else {}


def _step_json(record: StepRecord) -> str:
    return json.dumps({"event": "step", **record.model_dump()})


def _end_json(generation: Generation, side: str | None = None) -> str:
    end = {
        "event": "end",
        "text": generation.text,
        "tokens": generation.summary.tokens,
        "spikes": generation.summary.spikes,
        "finish_reason": generation.finish_reason,
        "summary": generation.summary.model_dump(),
    }
    if side is not None:
        end["side"] = side
    return json.dumps(end)


def _gate_mark(record: StepRecord) -> str:
    change = "intervened" if record.intervened else "kept base token"
    return (
        f"[gate spike at token {record.step}: D={record.divergence:.3f} "
        f"v={record.potential:.3f} alpha={record.alpha:.2f}, {change}]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    lm = load_from_args(args)
    sides = [("base", False), ("guarded", True)] if args.compare else [(None, True)]
    for side, guard in sides:
        if side and not args.json:
            print(f"=== {side} ===", flush=True)
        stream = lm.stream(args.prompt, guard=guard, **_alpha(args))
        for record in stream:
            if args.json:
                print(_step_json(record), flush=True)
                continue
            if record.spiked:
                print(f"\n{_gate_mark(record)}", file=sys.stderr, flush=True)
            print(record.text, end="", flush=True)
        generation = stream.generation
        if args.json:
            print(_end_json(generation, side), flush=True)
        else:
            summary = generation.summary
            print(
                f"\n[{summary.tokens} tokens, {summary.spikes} spikes, "
                f"{summary.intervened} intervened, {summary.seconds:.1f} s]",
                file=sys.stderr,
                flush=True,
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    lm = load_from_args(args)
    print(f"model: {lm.model_name}, expert: {lm.expert_kind}, device: {lm.device}")
    for label, prompt in DEMO_PROMPTS:
        print(f"\n##### {label} request: {prompt}")
        for side, guard in (("base alone", False), ("guarded", True)):
            generation = lm.generate(prompt, guard=guard, **_alpha(args))
            summary = generation.summary
            print(f"--- {side} ({summary.spikes} spikes, {summary.intervened} intervened)")
            print(generation.text.strip())
            for event in generation.gate_events:
                if event.intervened:
                    print(f"    {_gate_mark(event)}")
    return 0


def cmd_risk(args: argparse.Namespace) -> int:
    """Each prompt's risk reading as decoding would take it: alpha, risk and, for a probe
    reader, the probe's log-odds and the expert's first disagreement ``D_0``."""
    from .reflection import ProbeReader, ReflectionAlpha

    lm = load_from_args(args)
    policy = lm.alpha_policy
    if not isinstance(policy, ReflectionAlpha) or policy.features is None:
        raise ConfigError(
            "this engine has no risk reader that reads the prompt (a fixed alpha or no probe); "
            "the risk command needs an expert with a probe"
        )
    prompts = [[{"role": "user", "content": prompt}] for prompt in args.prompts]
    features = lm.read_features(prompts, policy.features)
    assessments = policy.assess(lm, args.prompts, features)
    reader = policy.reader
    terms = reader.terms(features) if isinstance(reader, ProbeReader) else None
    for index, (prompt, assessment) in enumerate(zip(args.prompts, assessments, strict=True)):
        row = {"prompt": prompt, "alpha": assessment.alpha, "risk": assessment.risk}
        if terms is not None:
            row |= {k: v for k, v in asdict(terms[index]).items() if k != "risk"}
        if args.json:
            print(json.dumps(row))
            continue
        parts = [f"risk {assessment.risk:5.2f}", f"alpha {assessment.alpha:.2f}"]
        if terms is not None:
            parts.append(f"probe log-odds {terms[index].probe_log_odds:6.2f}")
            if terms[index].first_divergence is not None:
                parts.append(f"D_0 {terms[index].first_divergence:.3f}")
        print("  ".join(parts) + f"  {prompt}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    report = run_bench(args)
    if args.json:
        print(json.dumps(report))
        return 0
    for run in report["runs"]:
        print(f"{run['expert_kind']} expert, {run['device']}, {run['dtype']}:")
        for point in [run["streaming"], *run.get("delays", [])]:
            print(
                f"  streaming {point['max_new_tokens']} tokens, max_stream_delay "
                f"{point['max_stream_delay']}: first token {point['guarded_ttft_ms']:.0f} vs "
                f"{point['base_ttft_ms']:.0f} ms (ttft_ratio {point['ttft_ratio']:.2f}), "
                f"longest gap {point['guarded_max_gap_ms']:.0f} vs "
                f"{point['base_max_gap_ms']:.0f} ms, time_ratio {point['time_ratio']:.3f}"
            )
        for entry in run["lengths"]:
            print(
                f"  generate {entry['max_new_tokens']} tokens: time_ratio "
                f"{entry['time_ratio']:.3f}, memory_ratio {entry['memory_ratio']:.3f}"
            )
        if "batch" in run:
            batch = run["batch"]
            print(
                f"  batch {batch['batch_size']}: {batch['guarded_tokens_per_s']:.1f} vs "
                f"{batch['base_tokens_per_s']:.1f} tokens/s "
                f"(throughput_ratio {batch['throughput_ratio']:.2f})"
            )
        if "reference" in run:
            print(f"  {run['reference']['speedup']:.1f}x faster than the reference decoding")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ngsd-guard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream a guarded answer")
    generate.add_argument("prompt")
    generate.add_argument("--json", action="store_true", help="one JSON object per line")
    generate.add_argument("--compare", action="store_true", help="base alone, then guarded")
    add_model_options(generate)
    generate.set_defaults(handler=cmd_generate)

    demo = commands.add_parser("demo", help="a harmful and a benign request, both ways")
    add_model_options(demo)
    demo.set_defaults(handler=cmd_demo, max_new_tokens=64)

    risk = commands.add_parser(
        "risk", help="the risk reading of requests (alpha, probe log-odds, D_0), no decoding"
    )
    risk.add_argument("prompts", nargs="+", metavar="prompt", help="user messages")
    risk.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_model_options(risk)
    risk.set_defaults(handler=cmd_risk)

    bench = commands.add_parser("bench", help="guarded vs base-alone latency, speed, memory")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--experts", default="lora", help="comma-separated expert kinds")
    bench.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    bench.add_argument("--lengths", default="64,256,1024", help="new tokens to time ('' skips)")
    bench.add_argument("--batch-size", type=int, default=8, help="0 skips the batch")
    bench.add_argument("--batch-tokens", type=int, default=64, help="new tokens per batch row")
    bench.add_argument(
        "--reference-tokens", type=int, default=256, help="0 skips the reference decoding"
    )
    bench.add_argument("--delays", default="", help="max_stream_delay values to trade off")
    bench.add_argument("--delay-tokens", type=int, default=256, help="new tokens per delay")
    add_model_options(bench)
    bench.set_defaults(handler=cmd_bench, max_new_tokens=64)

    for module in ("training", "evaluation", "serve"):
        try:
            command = __import__(f"{package}.{module}.command", fromlist=["add_parser"])
        except ModuleNotFoundError as error:
            if error.name != f"{package}.{module}.command" and error.name != f"{package}.{module}":
                raise
            continue
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.handler(args)
    except NGSDError as error:
        print(f"ngsd-guard: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
