"""What an expert on the upper layers saves: an in-process A/B of two untrained LoRA experts
on the embedded model, one on every decoder layer and one from ``--first-layer`` on (which
verifies on its own layers only, ``ngsd_guard.experts.Trunk``), against transformers
``generate`` on the base, alternating, at alpha 0 (as the policy reads benign prompts).

    python scripts/trunk_ab.py --first-layer 15 --passes 3

Prints, after every pass, the cumulative guarded/base throughput ratios of the bench's batch
of 8 and of its three benign prompts one at a time, 64 new tokens each.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from ngsd_guard import GuardedLM, bench
from ngsd_guard.loading import default_model_dir, load_model, load_tokenizer


def expert(first_layer: int, tokenizer) -> GuardedLM:
    model = load_model(default_model_dir(), device=torch.device("cpu"), dtype=torch.float32)
    layers = list(range(first_layer, model.config.num_hidden_layers)) if first_layer else None
    config = LoraConfig(
        r=16,
        lora_alpha=64,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers_to_transform=layers,
    )
    return GuardedLM.from_models(get_peft_model(model, config).eval(), tokenizer)


def _tokens(lm: GuardedLM, prompt: str) -> int:
    return lm.generate(prompt, max_new_tokens=64, alpha=0.0).summary.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-layer", type=int, default=15)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_dir())
    lms = {"every layer": expert(0, tokenizer), "upper layers": expert(args.first_layer, tokenizer)}
    for name, lm in lms.items():
        print(f"{name}: verifications from layer {lm.expert_first_layer}")
    reference = lms["every layer"]
    batch = list(bench.BATCH_PROMPTS)
    for lm in lms.values():  # warm-up
        lm.generate_batch(batch[:2], max_new_tokens=8, alpha=0.0)
    totals: dict[tuple[str, str], list[float]] = {}

    def timed(key: tuple[str, str], run) -> None:
        started = time.perf_counter()
        tokens = run()
        seconds, count = totals.setdefault(key, [0.0, 0])
        totals[key] = [seconds + time.perf_counter() - started, count + tokens]

    for done in range(1, args.passes + 1):
        timed(("batch", "base"), lambda: bench.base_generate(reference, batch, args.tokens))
        for name, lm in lms.items():
            timed(
                ("batch", name),
                lambda lm=lm: sum(
                    g.summary.tokens
                    for g in lm.generate_batch(batch, max_new_tokens=args.tokens, alpha=0.0)
                ),
            )
        for prompt in bench.BENCH_PROMPTS[:3]:
            timed(("single", "base"), lambda p=prompt: bench.base_generate(reference, [p], 64))
            for name, lm in lms.items():
                timed(("single", name), lambda lm=lm, p=prompt: _tokens(lm, p))
        rate = {key: count / seconds for key, (seconds, count) in totals.items()}
        ratios = {
            f"{mode} {name}": round(rate[(mode, name)] / rate[(mode, "base")], 3)
            for mode, name in rate
            if name != "base"
        }
        print(f"pass {done}: throughput against the base alone {ratios}", flush=True)


if __name__ == "__main__":
    main()
