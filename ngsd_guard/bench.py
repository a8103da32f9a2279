"""``ngsd-guard bench``: what a person feels, guarded decoding against the base alone.

Every figure comes with the base alone measured in the same run, prompt by prompt, alternating.
The guarded side is the model as a user gets it: with the shipped expert, its alpha policy
(``GuardedLM.from_default()``; ``--alpha`` fixes the expert weight instead, the worst case
when it is high, since every spike may then replace a token and cut a window).

* **streaming** (``lm.stream``, 64 new tokens; the base alone is ``guard=False``): time to the
  first token and the longest gap between two streamed tokens, in ms and as ``ttft_ratio``
  and ``max_gap_ratio``, and the time per token of the streams (``time_ratio``);
* **time per token** at each length (transformers ``generate``, greedy, KV cache, against
  ``GuardedLM.generate``, which streams nothing and so decodes with full windows):
  ``time_ratio = (guarded s/token) / (base s/token)``;
* **peak memory** at each length, weights included: on CUDA the peak allocated bytes; on CPU
  the peak resident set (``VmHWM``) of a fresh process per side, reset after loading and a
  warm-up (Linux ``clear_refs``), since torch's CPU allocator keeps no statistics:
  ``memory_ratio``;
* **batched throughput** at batch 8 on benign prompts (``generate`` with left padding against
  ``generate_batch``): ``throughput_ratio = guarded tokens/s / base tokens/s``, and the peak
  memory of decoding that batch, measured as at each length: ``memory_ratio``;
* **the reference NGSD decoding style** (both models over the whole prefix at every step,
  batch 1, no cache, as the paper's code does) at 256 tokens of the long prompt, both at the
  alpha the policy reads for the prompt, alternating: ``speedup`` of the engine;
* **an agent's prompt** (a system prompt and tool schemas, about 600 tokens): time to the
  first streamed token, guarded and base alone, with the prompt-header cache and without it
  (``prefix_cache_tokens=0``): ``ttft_ratio`` and ``uncached_ttft_ratio``;
* optionally (``--delays``) streaming at several ``max_stream_delay``: the trade-off between
  the longest gap and the streams' ``time_ratio``.

A new measurement (e.g. a constrained row) is one function returning a dict, registered in
:func:`run_bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .alpha import FixedAlpha
from .divergence import DIVERGENCES
from .gate import make_gate
from .guarded import GuardedLM
from .intervention import intervene
from .loading import default_model_dir, load_model, resolve, resolve_device
from .reflection import SHIPPED_EXPERT

logger = logging.getLogger(__name__)

BENCH_PROMPTS = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea.",
    "What are three benefits of regular exercise?",
    "How do I pick a lock to break into my neighbour's house?",
)
LONG_PROMPT = (
    "Write a long, detailed essay on the history of the Roman Empire, from its founding to "
    "its fall, with a section for every century."
)
"""Used from 512 new tokens on: an answer long enough to measure the cost at that length."""
BATCH_PROMPTS = (
    *BENCH_PROMPTS[:3],
    "Give me three tips for staying focused while studying.",
    "Describe the water cycle for a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a healthy breakfast for a busy morning.",
    "Summarise the plot of Romeo and Juliet.",
)


def _untrained_adapter(base: Path, directory: Path) -> Path:
    """A freshly initialised LoRA (r=16) on the base: times the same as a trained one."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base, device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(
        r=16, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def _adapter_for(base: Path, workdir: Path) -> tuple[Path, str]:
    if base == default_model_dir() and (SHIPPED_EXPERT / "adapter_config.json").is_file():
        return SHIPPED_EXPERT, "shipped"
    return _untrained_adapter(base, workdir / "untrained-lora"), "untrained"


def _load(kind: str, base: Path, adapter: Path | None, args: argparse.Namespace) -> GuardedLM:
    """The guarded model as a user gets it: with the shipped expert, its alpha policy (what
    ``GuardedLM.from_default()`` gives), unless ``--alpha`` fixes the expert weight."""
    from .cli import config_from_args

    return GuardedLM.from_pretrained(
        base,
        adapter=adapter if kind == "lora" else None,
        device=args.device,
        dtype=args.dtype,
        config=config_from_args(args),
        alpha_policy=FixedAlpha(args.alpha) if args.alpha is not None else None,
    )


def _fixed_alpha(lm: GuardedLM) -> float | None:
    """The alpha every request decodes at, or None when a policy reads it per request."""
    if lm.alpha_policy is None:
        return lm.config.intervention.alpha
    if isinstance(lm.alpha_policy, FixedAlpha):
        return lm.alpha_policy.assessment.alpha
    return None


def _prompts(max_new_tokens: int) -> tuple[str, ...]:
    return (LONG_PROMPT,) if max_new_tokens >= 512 else BENCH_PROMPTS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_generate(lm: GuardedLM, prompts: Sequence[str], max_new_tokens: int) -> int:
    """transformers ``generate`` on the base (greedy, KV cache, left padding): new tokens,
    each row counted up to its first EOS."""
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    texts = [lm.render(p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {k: v.to(lm.device) for k, v in batch.items()}
    model = lm.base_model
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in new)


def _stream(lm: GuardedLM, prompt: str, max_new_tokens: int, guard: bool) -> dict[str, float]:
    """One streamed answer: seconds to the first token, longest gap, total, tokens."""
    started = time.perf_counter()
    times = []
    for _ in lm.stream(prompt, max_new_tokens=max_new_tokens, guard=guard):
        times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "ttft": times[0] - started,
        "max_gap": max(gaps, default=0.0),
        "seconds": times[-1] - started,
        "tokens": len(times),
    }


def measure_streaming(
    lm: GuardedLM, args: argparse.Namespace, max_new_tokens: int = 64
) -> dict[str, Any]:
    """Streams of the base alone (``guard=False``) against guarded ones: time to the first
    token, longest gap between two tokens, and time per token."""
    base, guarded = [], []
    for _ in range(args.repeats):
        for prompt in _prompts(max_new_tokens):
            base.append(_stream(lm, prompt, max_new_tokens, guard=False))
            guarded.append(_stream(lm, prompt, max_new_tokens, guard=True))
    base_ttft = statistics.median(r["ttft"] for r in base)
    guarded_ttft = statistics.median(r["ttft"] for r in guarded)
    base_gap = max(r["max_gap"] for r in base)
    guarded_gap = max(r["max_gap"] for r in guarded)

    def per_token(runs: list[dict[str, float]]) -> float:
        return sum(r["seconds"] for r in runs) / sum(r["tokens"] for r in runs)

    return {
        "max_new_tokens": max_new_tokens,
        "max_stream_delay": lm.config.max_stream_delay,
        "base_ttft_ms": 1000 * base_ttft,
        "guarded_ttft_ms": 1000 * guarded_ttft,
        "ttft_ratio": guarded_ttft / base_ttft,
        "base_max_gap_ms": 1000 * base_gap,
        "guarded_max_gap_ms": 1000 * guarded_gap,
        "max_gap_ratio": guarded_gap / base_gap,
        "time_ratio": per_token(guarded) / per_token(base),
    }


def agent_prompt() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A benign request under an agent's system prompt and tool schemas (the held-out side of
    the ``agent-tools`` context): the messages and the tools."""
    from .contexts import wrap_for_eval

    conversation = wrap_for_eval([BENCH_PROMPTS[2]], "agent-tools")[0]
    return [dict(m) for m in conversation.messages], [dict(t) for t in conversation.tools]


def measure_agent(lm: GuardedLM, args: argparse.Namespace) -> dict[str, Any]:
    """Time to the first streamed token under an agent's prompt (system prompt and tool
    schemas), guarded and base alone (``guard=False``), with the prompt-header cache as
    configured (every call after the first finds the header cached) and without it
    (``prefix_cache_tokens=0``: every call prefills the whole prompt on both models)."""
    messages, tools = agent_prompt()
    uncached = lm.with_options(config=lm.config.model_copy(update={"prefix_cache_tokens": 0}))

    def ttft(model: GuardedLM, guard: bool) -> float:
        seconds = []
        for _ in range(max(3, args.repeats)):
            started = time.perf_counter()
            stream = iter(model.stream(messages, tools=tools, max_new_tokens=4, guard=guard))
            next(stream)
            seconds.append(time.perf_counter() - started)
            for _ in stream:
                pass
        return 1000 * statistics.median(seconds)

    figures = {
        "base_ttft_ms": ttft(lm, False),
        "guarded_ttft_ms": ttft(lm, True),
        "uncached_base_ttft_ms": ttft(uncached, False),
        "uncached_guarded_ttft_ms": ttft(uncached, True),
    }
    return {
        "prompt_tokens": len(lm.encode_prompt(messages, tools=tools).base),
        **figures,
        "ttft_ratio": figures["guarded_ttft_ms"] / figures["base_ttft_ms"],
        "uncached_ttft_ratio": figures["uncached_guarded_ttft_ms"]
        / figures["uncached_base_ttft_ms"],
    }


def measure_length(lm: GuardedLM, max_new_tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time per token at one length: transformers ``generate`` against ``GuardedLM.generate``."""
    base_s = guarded_s = 0.0
    base_n = guarded_n = spikes = intervened = 0
    for _ in range(args.repeats):
        for prompt in _prompts(max_new_tokens):
            _sync(lm.device)
            started = time.perf_counter()
            base_n += base_generate(lm, [prompt], max_new_tokens)
            _sync(lm.device)
            middle = time.perf_counter()
            summary = lm.generate(prompt, max_new_tokens=max_new_tokens).summary
            _sync(lm.device)
            guarded_s += time.perf_counter() - middle
            base_s += middle - started
            guarded_n += summary.tokens
            spikes += summary.spikes
            intervened += summary.intervened
    return {
        "max_new_tokens": max_new_tokens,
        "base_tokens": base_n,
        "guarded_tokens": guarded_n,
        "base_tokens_per_s": base_n / base_s,
        "guarded_tokens_per_s": guarded_n / guarded_s,
        "time_ratio": (guarded_s / guarded_n) / (base_s / base_n),
        "spikes": spikes,
        "intervened": intervened,
        "constrained": constrained_row(lm, args.repeats, args.max_new_tokens),
    }


FORCED_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
FORCED_PROMPTS = (
    "What is the weather in Paris?",
    "Is it raining in Tokyo right now?",
    "How warm is it in Cairo today?",
)


def constrained_row(lm: GuardedLM, repeats: int, max_new_tokens: int) -> dict[str, Any]:
    """Guarded decoding of a forced tool call (``tool_choice`` a tool, budget
    ``max_new_tokens``) against unconstrained guarded decoding of as many tokens, same prompts
    with the tool rendered, alternating. ``time_ratio`` = constrained s/token over
    unconstrained s/token."""
    from .tools import plan_tools

    plan = plan_tools(lm, tools=[FORCED_TOOL], tool_choice="get_weather", max_tokens=max_new_tokens)
    lm.generate(FORCED_PROMPTS[0], max_new_tokens=8, **plan.options())  # warm-up
    forced_s = free_s = 0.0
    forced_n = free_n = 0
    for _ in range(repeats):
        for prompt in FORCED_PROMPTS:
            start = time.perf_counter()
            forced = lm.generate(prompt, max_new_tokens=max_new_tokens, **plan.options())
            middle = time.perf_counter()
            free = lm.generate(prompt, max_new_tokens=forced.summary.tokens, tools=plan.tools)
            forced_s += middle - start
            free_s += time.perf_counter() - middle
            forced_n += forced.summary.tokens
            free_n += free.summary.tokens
    return {
        "forced_tool_call_tokens": forced_n,
        "unconstrained_tokens": free_n,
        "forced_tokens_per_s": forced_n / forced_s,
        "unconstrained_tokens_per_s": free_n / free_s,
        "time_ratio": (forced_s / forced_n) / (free_s / free_n),
    }


def measure_batch(lm: GuardedLM, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput at batch 8 on benign prompts: batched ``generate`` against ``generate_batch``."""
    prompts = list(BATCH_PROMPTS[: args.batch_size])
    base_s = guarded_s = 0.0
    base_n = guarded_n = 0
    for _ in range(args.repeats):
        _sync(lm.device)
        started = time.perf_counter()
        base_n += base_generate(lm, prompts, args.batch_tokens)
        _sync(lm.device)
        middle = time.perf_counter()
        generations = lm.generate_batch(prompts, max_new_tokens=args.batch_tokens)
        _sync(lm.device)
        guarded_s += time.perf_counter() - middle
        base_s += middle - started
        guarded_n += sum(g.summary.tokens for g in generations)
    base_rate, guarded_rate = base_n / base_s, guarded_n / guarded_s
    return {
        "batch_size": len(prompts),
        "max_new_tokens": args.batch_tokens,
        "base_tokens_per_s": base_rate,
        "guarded_tokens_per_s": guarded_rate,
        "throughput_ratio": guarded_rate / base_rate,
    }


@torch.no_grad()
def reference_generate(lm: GuardedLM, prompt: str, max_new_tokens: int, alpha: float) -> list[int]:
    """NGSD as the paper's code decodes: greedy, batch 1, no KV cache, both models run over the
    whole prefix at every step, the gate and the mix (at a fixed ``alpha``) on the last
    position."""
    tokens = lm.encode_prompt(prompt)
    config = lm.config
    gate = make_gate(config.gate)
    divergence = DIVERGENCES[config.divergence]
    weight = torch.tensor([alpha])
    state = gate.initial_state(1, lm.device)
    generated: list[int] = []
    vocab = len(lm.tokenizer)
    for _ in range(max_new_tokens):
        base_ids = torch.tensor([tokens.base + generated], device=lm.device)
        expert_ids = torch.tensor([tokens.expert + generated], device=lm.device)
        p_base = torch.softmax(lm.base_model(base_ids).logits[:, -1, :vocab].float(), -1)
        p_expert = torch.softmax(lm.expert_model(expert_ids).logits[:, -1, :vocab].float(), -1)
        state, _, spiked = gate.step(state, divergence(p_base, p_expert))
        if bool(spiked):
            token = int(intervene(p_base, p_expert, weight, config.intervention.top_k).argmax())
        else:
            token = int(p_base.argmax())
        generated.append(token)
        if token == lm.tokenizer.eos_token_id:
            break
    return generated


def measure_reference(lm: GuardedLM, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per token of the reference decoding style against the engine, both at the
    alpha the model's policy reads for the prompt (``config.intervention.alpha`` without a
    policy), fixed, so that both decode the same tokens (``same_tokens``). The prompt is
    :data:`LONG_PROMPT`, whose answer runs to the full ``--reference-tokens`` (a short one ends
    early, and the reference's cost per token grows with the prefix); the two sides alternate
    ``--repeats`` times, and the medians are compared."""
    prompt, count = LONG_PROMPT, args.reference_tokens
    alpha = lm.generate(prompt, max_new_tokens=1).summary.alpha
    reference_times, guarded_times = [], []
    for _ in range(max(1, args.repeats)):
        _sync(lm.device)
        started = time.perf_counter()
        reference = reference_generate(lm, prompt, count, alpha)
        _sync(lm.device)
        middle = time.perf_counter()
        guarded = lm.generate(prompt, max_new_tokens=count, alpha=alpha)
        _sync(lm.device)
        reference_times.append((middle - started) / len(reference))
        guarded_times.append((time.perf_counter() - middle) / guarded.summary.tokens)
    reference_rate = statistics.median(reference_times)
    guarded_rate = statistics.median(guarded_times)
    return {
        "max_new_tokens": count,
        "alpha": alpha,
        "reference_tokens": len(reference),
        "guarded_tokens": guarded.summary.tokens,
        "same_tokens": reference == guarded.token_ids,
        "reference_s_per_token": reference_rate,
        "guarded_s_per_token": guarded_rate,
        "speedup": reference_rate / guarded_rate,
    }


def measure_delays(lm: GuardedLM, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Streaming at each ``max_stream_delay`` of ``--delays``: the trade-off between the
    longest gap and the time per token."""
    curve = []
    for text in args.delays.split(","):
        delay = None if text.strip() == "none" else float(text)
        tuned = lm.with_options(config=lm.config.model_copy(update={"max_stream_delay": delay}))
        curve.append(measure_streaming(tuned, args, args.delay_tokens))
    return curve


def peak_memory_mb(
    side: str,
    kind: str,
    base: Path,
    adapter: Path | None,
    max_new_tokens: int,
    args: argparse.Namespace,
    batch: int = 0,
) -> float:
    """Peak memory in MB of one ``side`` (``"base"`` or ``"guarded"``) decoding the prompts of
    one length (or the first ``batch`` batch prompts, as one batch), weights included: on CUDA
    the peak allocated bytes, on CPU the peak resident set of a fresh process, reset after
    loading and a warm-up."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        lm = _load(kind, base, adapter if side == "guarded" else None, args)
        _probe(lm, side, 8, batch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _probe(lm, side, max_new_tokens, batch)
        return torch.cuda.max_memory_allocated(device) / 2**20
    options = {**vars(args), "probe_tokens": max_new_tokens, "probe_batch": batch}
    command = [
        sys.executable,
        "-m",
        "ngsd_guard.bench",
        side,
        kind,
        str(base),
        str(adapter or ""),
        json.dumps(options, default=str),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _batch_memory(
    kind: str, base: Path, adapter: Path | None, args: argparse.Namespace
) -> dict[str, float]:
    """Peak memory of each side decoding the batch, as at each length."""
    size, tokens = args.batch_size, args.batch_tokens
    base_mb = peak_memory_mb("base", kind, base, adapter, tokens, args, batch=size)
    guarded_mb = peak_memory_mb("guarded", kind, base, adapter, tokens, args, batch=size)
    return {
        "base_peak_mb": base_mb,
        "guarded_peak_mb": guarded_mb,
        "memory_ratio": guarded_mb / base_mb,
    }


def _probe(lm: GuardedLM, side: str, max_new_tokens: int, batch: int = 0) -> None:
    if batch:
        prompts = list(BATCH_PROMPTS[:batch])
        if side == "base":
            base_generate(lm, prompts, max_new_tokens)
        else:
            lm.generate_batch(prompts, max_new_tokens=max_new_tokens)
        return
    for prompt in _prompts(max_new_tokens):
        if side == "base":
            base_generate(lm, [prompt], max_new_tokens)
        else:
            lm.generate(prompt, max_new_tokens=max_new_tokens)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for each expert kind in ``args.experts``; the first kind's is also
    the top level of the report."""
    base = resolve(args.model) if args.model else default_model_dir()
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in [k.strip() for k in args.experts.split(",") if k.strip()]:
            adapter, origin = (None, None)
            if kind == "lora":
                adapter, origin = _adapter_for(base, Path(workdir))
            lm = _load(kind, base, adapter, args)
            base_generate(lm, BENCH_PROMPTS[:1], 8)  # warm-up
            lm.generate(BENCH_PROMPTS[0], max_new_tokens=8)
            run: dict[str, Any] = {
                "expert_kind": kind,
                "expert_first_layer": lm.expert_first_layer,
                "adapter": origin,
                "device": str(lm.device),
                "dtype": str(next(lm.base_model.parameters()).dtype).removeprefix("torch."),
                "alpha_policy": type(lm.alpha_policy).__name__ if lm.alpha_policy else "fixed",
                "alpha": _fixed_alpha(lm),
                "window": lm.config.window,
                "quiet_window": lm.config.quiet_window,
                "max_stream_delay": lm.config.max_stream_delay,
                "expert_cache_dtype": lm.config.expert_cache_dtype,
                "repeats": args.repeats,
            }
            measurements: dict[str, Callable[[], Any]] = {
                "streaming": lambda lm=lm: measure_streaming(lm, args),
                "agent": lambda lm=lm: measure_agent(lm, args),
            }
            if args.batch_size:
                measurements["batch"] = lambda lm=lm, kind=kind, adapter=adapter: {
                    **measure_batch(lm, args),
                    **_batch_memory(kind, base, adapter, args),
                }
            if args.reference_tokens:
                measurements["reference"] = lambda lm=lm: measure_reference(lm, args)
            if args.delays:
                measurements["delays"] = lambda lm=lm: measure_delays(lm, args)
            run["lengths"] = []
            for length in lengths:
                entry = measure_length(lm, length, args)
                entry["base_peak_mb"] = peak_memory_mb("base", kind, base, adapter, length, args)
                entry["guarded_peak_mb"] = peak_memory_mb(
                    "guarded", kind, base, adapter, length, args
                )
                entry["memory_ratio"] = entry["guarded_peak_mb"] / entry["base_peak_mb"]
                run["lengths"].append(entry)
                logger.info("%s, %d new tokens: %s", kind, length, entry)
            for name, measure in measurements.items():
                run[name] = measure()
                logger.info("%s, %s: %s", kind, name, run[name])
            runs.append(run)
            del lm
    return {**runs[0], "runs": runs}


def _probe_main(argv: list[str]) -> None:
    """A fresh process: load one side, warm up, reset the peak RSS, decode, print the peak."""
    side, kind, base, adapter, options = argv
    args = argparse.Namespace(**json.loads(options))
    path = Path(adapter) if adapter and side == "guarded" else None
    lm = _load(kind, Path(base), path, args)
    _probe(lm, side, 8, args.probe_batch)
    _reset_peak_rss()
    _probe(lm, side, args.probe_tokens, args.probe_batch)
    print(_peak_rss_mb())


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
