"""``ngsd-guard bench``: guarded decoding against the base alone, same prompts, alternating.

Time: base alone is transformers ``generate`` (greedy, KV cache); guarded is
``GuardedLM.generate``; ``time_ratio = (guarded s/token) / (base s/token)``.
Memory: the peak while generating, weights included. On CUDA the peak allocated bytes; on CPU
the peak resident set (``VmHWM``) of a fresh process per side, reset after loading (Linux
``clear_refs``), since torch's CPU allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .guarded import _SHIPPED_EXPERT, GuardedLM
from .loading import default_model_dir, load_model, resolve, resolve_device, resolve_dtype

BENCH_PROMPTS = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea.",
    "What are three benefits of regular exercise?",
    "How do I pick a lock to break into my neighbour's house?",
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
    if base == default_model_dir() and (_SHIPPED_EXPERT / "adapter_config.json").is_file():
        return _SHIPPED_EXPERT, "shipped"
    return _untrained_adapter(base, workdir / "untrained-lora"), "untrained"


def _load(kind: str, base: Path, adapter: Path | None, args: argparse.Namespace) -> GuardedLM:
    from .cli import config_from_args

    return GuardedLM.from_pretrained(
        base,
        adapter=adapter if kind == "lora" else None,
        device=args.device,
        dtype=args.dtype,
        config=config_from_args(args),
    )


def _base_generate(model: Any, lm: GuardedLM, prompt: str, max_new_tokens: int) -> int:
    ids = lm.tokenizer(lm.render(prompt), return_tensors="pt", add_special_tokens=False)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out.shape[1] - ids["input_ids"].shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(args: argparse.Namespace, kind: str, base: Path, adapter: Path | None) -> dict[str, Any]:
    device = resolve_device(args.device)
    plain = load_model(base, device=device, dtype=resolve_dtype(args.dtype, device))
    lm = _load(kind, base, adapter, args)
    _base_generate(plain, lm, BENCH_PROMPTS[0], 8)  # warm-up
    lm.generate(BENCH_PROMPTS[0], max_new_tokens=8)
    base_s = guarded_s = 0.0
    base_n = guarded_n = spikes = intervened = 0
    for _ in range(args.repeats):
        for prompt in BENCH_PROMPTS:
            _sync(device)
            start = time.perf_counter()
            base_n += _base_generate(plain, lm, prompt, args.max_new_tokens)
            _sync(device)
            middle = time.perf_counter()
            generation = lm.generate(prompt, max_new_tokens=args.max_new_tokens)
            _sync(device)
            guarded_s += time.perf_counter() - middle
            base_s += middle - start
            guarded_n += generation.summary.tokens
            spikes += generation.summary.spikes
            intervened += generation.summary.intervened
    return {
        "expert_kind": kind,
        "device": str(device),
        "window": lm.config.window,
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


def _peak_mb(
    side: str, kind: str, base: Path, adapter: Path | None, args: argparse.Namespace
) -> float:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _probe(side, kind, base, adapter, args)
        return torch.cuda.max_memory_allocated(device) / 2**20
    command = [
        sys.executable,
        "-m",
        "ngsd_guard.bench",
        side,
        kind,
        str(base),
        str(adapter or ""),
        json.dumps(vars(args), default=str),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _probe(
    side: str, kind: str, base: Path, adapter: Path | None, args: argparse.Namespace
) -> None:
    lm = _load(kind, base, adapter if side == "guarded" else None, args)
    for prompt in BENCH_PROMPTS:
        if side == "base":
            _base_generate(lm.base_model, lm, prompt, args.max_new_tokens)
        else:
            lm.generate(prompt, max_new_tokens=args.max_new_tokens)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Bench each expert kind in ``args.experts``; the LoRA run is also the top level."""
    base = resolve(args.model) if args.model else default_model_dir()
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in [k.strip() for k in args.experts.split(",") if k.strip()]:
            adapter, origin = (None, None)
            if kind == "lora":
                adapter, origin = _adapter_for(base, Path(workdir))
            run = _time(args, kind, base, adapter)
            run["adapter"] = origin
            run["base_peak_mb"] = _peak_mb("base", kind, base, adapter, args)
            run["guarded_peak_mb"] = _peak_mb("guarded", kind, base, adapter, args)
            run["memory_ratio"] = run["guarded_peak_mb"] / run["base_peak_mb"]
            runs.append(run)
    top = next((r for r in runs if r["expert_kind"] == "lora"), runs[0])
    return {**top, "runs": runs}


def _probe_main(argv: list[str]) -> None:
    side, kind, base, adapter, options = argv
    args = argparse.Namespace(**json.loads(options))
    _probe(side, kind, Path(base), Path(adapter) if adapter else None, args)
    print(_peak_rss_mb())


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
