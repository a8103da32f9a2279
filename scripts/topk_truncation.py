"""What top-k truncation does to NGSD's divergence and gate (for running NGSD against an engine
such as vLLM or SGLang, whose OpenAI-compatible APIs return only the top-k logprobs).

On the default model and its shipped LoRA expert: 8 AdvBench test requests and 8 AlpacaEval
requests are answered by guarded decoding (64 tokens); then both models score every answer
position in one forward, and the total variation ``D = 1/2 sum |p_b - p_e|`` of the full
distributions is compared with that of each side's top-k, renormalised, over the union of the
two top-k sets. The LIF gate (tau 8, threshold 1, from rest) runs over both series, and the
intervention's greedy choice ``argmax (p_b + alpha (p_e - p_b))`` on ``top64(p_b) U top64(p_e)``
(alpha 0.9) is compared at every position.

    flock /tmp/ngsd-cpu.lock .venv/bin/python scripts/topk_truncation.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ngsd_guard import GateConfig, GuardedLM
from ngsd_guard.gate import make_gate
from ngsd_guard.loading import default_model_dir

ADAPTER = Path(__file__).parents[1] / "ngsd_guard/data/experts/smollm2-135m-instruct"


def truncated(p: torch.Tensor, k: int) -> torch.Tensor:
    """(T, V) -> (T, V): each row's top-k, renormalised; zero elsewhere."""
    values, index = p.topk(k, dim=-1)
    return torch.zeros_like(p).scatter(-1, index, values / values.sum(-1, keepdim=True))


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def intervened_choice(p_base: torch.Tensor, p_expert: torch.Tensor) -> torch.Tensor:
    """(T, V) x2 -> (T,) the greedy intervened token over the top-64 union, alpha 0.9."""
    union = torch.zeros_like(p_base, dtype=torch.bool)
    union.scatter_(-1, p_base.topk(64, -1).indices, True)
    union.scatter_(-1, p_expert.topk(64, -1).indices, True)
    mixed = p_base + 0.9 * (p_expert - p_base)
    return mixed.masked_fill(~union, float("-inf")).argmax(-1)


def spikes(divergence: torch.Tensor) -> torch.Tensor:
    """(T,) divergences -> (T,) bool spikes of the default LIF gate, from rest."""
    gate = make_gate(GateConfig())
    state = gate.initial_state(1, torch.device("cpu"))
    fired = []
    for d in divergence:
        state, _, spiked = gate.step(state, d.view(1))
        fired.append(spiked)
    return torch.cat(fired)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--per-set", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ks", default="5,20,64")
    args = parser.parse_args()
    data = Path(args.data_dir)
    advbench = json.loads((data / "advbench_harmful_behaviors.json").read_text())
    alpaca = json.loads((data / "alpaca_eval.json").read_text())
    prompts = [r["goal"] for r in advbench if int(r["id"]) >= 260][: args.per_set]
    prompts += [r["instruction"] for r in alpaca[: args.per_set]]

    lm = GuardedLM.from_default()
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    expert = PeftModel.from_pretrained(base, ADAPTER).eval()
    ks = [int(k) for k in args.ks.split(",")]
    full_all, cut_all = [], {k: [] for k in ks}
    chosen_all, cut_chosen = [], {k: [] for k in ks}
    for prompt in prompts:
        answer = lm.generate(prompt, max_new_tokens=args.tokens).token_ids
        prompt_ids = lm.tokenizer(lm.render(prompt), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer])
        positions = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer))
        p_expert = torch.softmax(expert(ids).logits[0, positions].float(), -1)
        with expert.disable_adapter():
            p_base = torch.softmax(expert(ids).logits[0, positions].float(), -1)
        full_all.append(total_variation(p_base, p_expert))
        chosen_all.append(intervened_choice(p_base, p_expert))
        for k in ks:
            cut_base, cut_expert = truncated(p_base, k), truncated(p_expert, k)
            cut_all[k].append(total_variation(cut_base, cut_expert))
            cut_chosen[k].append(intervened_choice(cut_base, cut_expert))

    full = torch.cat(full_all)
    chosen = torch.cat(chosen_all)
    full_spikes = torch.cat([spikes(d) for d in full_all])
    print(f"{len(prompts)} requests, {full.numel()} answer positions; mean TV {full.mean():.4f}")
    print(
        "| k | mean abs(dTV) | max abs(dTV) | mean dTV | Pearson r | spikes full -> top-k "
        "| same intervened token |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in ks:
        cut = torch.cat(cut_all[k])
        delta = cut - full
        r = torch.corrcoef(torch.stack([full, cut]))[0, 1]
        cut_spikes = torch.cat([spikes(d) for d in cut_all[k]])
        agree = (cut_spikes == full_spikes).float().mean()
        same_choice = (torch.cat(cut_chosen[k]) == chosen).float().mean()
        print(
            f"| {k} | {delta.abs().mean():.4f} | {delta.abs().max():.4f} | {delta.mean():+.4f} "
            f"| {r:.4f} | {int(full_spikes.sum())} -> {int(cut_spikes.sum())} "
            f"({agree:.1%} of positions agree) | {same_choice:.1%} |"
        )


if __name__ == "__main__":
    main()
