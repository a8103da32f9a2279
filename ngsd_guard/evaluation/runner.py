"""Base alone vs guarded on a set, and the metrics of issue 3.

Per side (``base``: the base alone through the same loop, ``guarded``: NGSD):
``refusal_rate`` (keyword judge, :func:`ngsd_guard.judge.is_refusal`), ``asr`` (1 - refusal
rate, harmful sets only, else None), ``spikes_per_prompt``, ``gate_silent`` (share of prompts
where the gate never fired), ``mean_divergence`` (mean over prompts of each output's mean
divergence), ``tokens_per_s``; the guarded side adds ``identical_to_base`` (share of outputs
equal to the base's, character for character), ``mean_alpha`` / ``mean_risk`` and ``escalated``
(share of answers whose alpha rose mid-answer).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..contexts import Conversation
from ..judge import is_refusal, points_to_help
from .sets import EvalSet

if TYPE_CHECKING:
    from ..guarded import GuardedLM
    from ..records import Generation

logger = logging.getLogger(__name__)


def side_metrics(
    generations: Sequence[Generation], label: str, seconds: float
) -> dict[str, float | None]:
    """The metrics of one side on one set."""
    n = len(generations)
    refusals = sum(is_refusal(g.text) for g in generations)
    tokens = sum(g.summary.tokens for g in generations)
    return {
        "refusal_rate": refusals / n,
        "asr": 1 - refusals / n if label == "harmful" else None,
        "spikes_per_prompt": sum(g.summary.spikes for g in generations) / n,
        "gate_silent": sum(g.summary.spikes == 0 for g in generations) / n,
        "mean_divergence": sum(g.summary.mean_divergence for g in generations) / n,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "tokens": tokens,
    }


def _run_side(
    lm: GuardedLM,
    items: Sequence[Conversation],
    *,
    guard: bool,
    batch_size: int,
    options: dict[str, Any],
) -> tuple[list[Generation], float]:
    """Generate for every item, in batches of items that offer the same tools and answer
    format; tools, ``tool_choice`` and ``response_format`` are mapped as the integrations map
    them (:func:`~ngsd_guard.tools.plan_tools`: a structured answer or a forced call is decoded
    under its grammar)."""
    from ..tools import plan_tools

    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        key = json.dumps([item.tools, item.tool_choice, item.response_format], sort_keys=True)
        groups.setdefault(key, []).append(index)
    generations: dict[int, Generation] = {}
    started = time.perf_counter()
    for indices in groups.values():
        first = items[indices[0]]
        planned = {}
        if first.tools or first.response_format is not None:
            planned = plan_tools(
                lm,
                tools=list(first.tools) or None,
                tool_choice=first.tool_choice,
                response_format=first.response_format,
                max_tokens=options["max_new_tokens"],
            ).options()
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [list(items[i].messages) for i in chunk]
            outputs = lm.generate_batch(prompts, guard=guard, **options, **planned)
            generations.update(zip(chunk, outputs, strict=True))
            logger.info("%s %d/%d", "guarded" if guard else "base", len(generations), len(items))
    return [generations[i] for i in range(len(items))], time.perf_counter() - started


def evaluate_set(
    lm: GuardedLM,
    eval_set: EvalSet,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    early_stop_after: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(result entry, per-prompt rows)`` for one set and label."""
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    base, base_s = _run_side(
        lm, eval_set.items, guard=False, batch_size=batch_size, options=options
    )
    if early_stop_after is not None:
        options["early_stop_after"] = early_stop_after
    guarded, guard_s = _run_side(
        lm, eval_set.items, guard=True, batch_size=batch_size, options=options
    )
    base_metrics = side_metrics(base, eval_set.label, base_s)
    guarded_metrics = side_metrics(guarded, eval_set.label, guard_s)
    n = len(eval_set.items)
    guarded_metrics["identical_to_base"] = (
        sum(g.text == b.text for g, b in zip(guarded, base, strict=True)) / n
    )
    guarded_metrics["mean_alpha"] = sum(g.summary.alpha for g in guarded) / n
    guarded_metrics["escalated"] = sum(g.summary.escalated for g in guarded) / n
    risks = [g.summary.risk for g in guarded if g.summary.risk is not None]
    guarded_metrics["mean_risk"] = sum(risks) / len(risks) if risks else None
    entry = {
        "set": eval_set.name,
        "context": eval_set.context,
        "label": eval_set.label,
        "n": n,
        "base": base_metrics,
        "guarded": guarded_metrics,
    }
    rows = [
        {
            "set": eval_set.name,
            "context": eval_set.context,
            "variant": item.variant,
            "label": eval_set.label,
            "prompt": item.request,
            "base": b.text,
            "guarded": g.text,
            "base_refusal": is_refusal(b.text),
            "guarded_refusal": is_refusal(g.text),
            "guarded_points_to_help": points_to_help(g.text),
            "spikes": g.summary.spikes,
            "intervened": g.summary.intervened,
            "alpha": g.summary.alpha,
            "escalated": g.summary.escalated,
            "risk": g.summary.risk,
            "mean_divergence": g.summary.mean_divergence,
        }
        for item, b, g in zip(eval_set.items, base, guarded, strict=True)
    ]
    return entry, rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results, one row per set and label."""
    header = (
        "| set | context | label | n | refusal base | refusal guarded | ASR base | ASR guarded | "
        "identical to base | gate silent | spikes/prompt | mean div | tok/s base | "
        "tok/s guarded |"
    )
    lines = [header, "|" + " --- |" * 14]
    for r in results:
        b, g = r["base"], r["guarded"]
        lines.append(
            f"| {r['set']} | {r.get('context', 'bare')} | {r['label']} | {r['n']} | "
            f"{_pct(b['refusal_rate'])} | "
            f"{_pct(g['refusal_rate'])} | {_pct(b['asr'])} | {_pct(g['asr'])} | "
            f"{_pct(g['identical_to_base'])} | {_pct(g['gate_silent'])} | "
            f"{_num(g['spikes_per_prompt'], 1)} | {_num(g['mean_divergence'], 3)} | "
            f"{_num(b['tokens_per_s'], 0)} | {_num(g['tokens_per_s'], 0)} |"
        )
    return "\n".join(lines)


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table pooling the sets of each context and label (weighted by ``n``): the
    harmful sets' refusal rates and ASR, the benign sets' refusal rates and identical share."""
    pooled: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        key = (r.get("context", "bare"), r["label"])
        into = pooled.setdefault(
            key, dict.fromkeys(("n", "base", "guarded", "same", "escalated"), 0.0)
        )
        n = r["n"]
        into["n"] += n
        into["base"] += n * r["base"]["refusal_rate"]
        into["guarded"] += n * r["guarded"]["refusal_rate"]
        into["same"] += n * r["guarded"]["identical_to_base"]
        into["escalated"] += n * r["guarded"].get("escalated", 0.0)  # older files lack it
    lines = [
        "| context | label | n | refusal base | refusal guarded | ASR base | ASR guarded | "
        "identical to base | escalated |",
        "|" + " --- |" * 9,
    ]
    for (context, label), p in pooled.items():
        n = p["n"]
        harmful = label == "harmful"
        lines.append(
            f"| {context} | {label} | {n:.0f} | {_pct(p['base'] / n)} | "
            f"{_pct(p['guarded'] / n)} | {_pct(1 - p['base'] / n if harmful else None)} | "
            f"{_pct(1 - p['guarded'] / n if harmful else None)} | {_pct(p['same'] / n)} | "
            f"{_pct(p['escalated'] / n)} |"
        )
    return "\n".join(lines)
