"""``train_expert``: data, probe, LoRA, and the artefacts, in one deterministic run."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..contexts import Conversation
from ..features import PromptFeatures
from ..guarded import GuardedLM
from ..reflection import DEFAULT_RISK_MAP, POLICY_FILE, ProbeReader, ReflectionAlpha
from .calibrate import choose_escalation, dissents, is_holdout
from .data import BuildConfig, PlannedRequest, build_dataset, save_examples
from .probe import cross_validated_auc, fit_probe, probe_features
from .trainer import LoraSettings, train_lora, wrap_lora

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.safetensors"
DEFAULT_PROBE_FEATURES = PromptFeatures.parse("last@30+mean@18")
"""Chosen by the probe ablation in README (final output at the last token, and layer 18
averaged over the last user message)."""
RECORD_FILE = "training.json"


def save_adapter_fp16(model, out: Path, base_name: str) -> None:
    """``save_pretrained`` then store the LoRA weights in fp16 (half the size)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_expert(
    model,
    tokenizer,
    *,
    plan: Sequence[PlannedRequest],
    out: str | Path,
    base_name: str,
    build: BuildConfig | None = None,
    lora: LoraSettings | None = None,
    probe: PromptFeatures | None = DEFAULT_PROBE_FEATURES,
    calibrate: bool = True,
    examples_path: str | Path | None = None,
    command: str = "",
) -> dict[str, object]:
    """Train the probe (on the plain base; ``probe`` names its features, None skips it) and
    a LoRA expert from planned requests (see :func:`~ngsd_guard.training.data.plan_requests`),
    then, with ``calibrate``, choose the alpha escalation on the held-out slice of the plan
    (:mod:`~ngsd_guard.training.calibrate`); write the adapter dir, the probe, ``policy.json``
    and ``training.json`` under ``out``. Returns the record."""
    build = build or BuildConfig()
    lora = lora or LoraSettings(seed=build.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(build.seed)
    torch.manual_seed(build.seed)
    started = time.perf_counter()
    model.eval()
    # Rendered exactly as the engine renders requests (chat template, tools).
    engine = GuardedLM.from_models(model, tokenizer)

    def render(conversation: Conversation) -> list[int]:
        text = engine.render(list(conversation.messages), tools=list(conversation.tools) or None)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    calibrate = calibrate and probe is not None
    holdout = [p for p in plan if calibrate and is_holdout(p.conversation.request)]
    plan = [p for p in plan if not (calibrate and is_holdout(p.conversation.request))]
    record: dict[str, object] = {"base": base_name, "command": command}
    if probe is not None:
        record["probe"] = _train_probe(engine, plan, probe, out, base_name, build)

    dataset = build_dataset(model, tokenizer, plan, render, build)
    examples = [ex for ex in dataset.examples if len(ex.input_ids) <= lora.max_length]
    dataset.stats["dropped_over_max_length"] = len(dataset.examples) - len(examples)
    record["data"] = dataset.stats
    if examples_path is not None:
        save_examples(dataset, examples_path, tokenizer)
    peft_model = wrap_lora(model, lora)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = train_lora(peft_model, examples, lora, pad_id=pad)
    save_adapter_fp16(peft_model, out, base_name)
    record["training"] = {
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "first_loss": round(report.first_loss, 4),
        "last_loss": round(report.last_loss, 4),
        "lora": report.settings,
        "device": str(next(model.parameters()).device),
    }
    if calibrate:
        record["calibration"] = _calibrate(peft_model, tokenizer, holdout, out, build)
    record["build"] = asdict(build)
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _calibrate(
    peft_model, tokenizer, holdout: Sequence[PlannedRequest], out: Path, build: BuildConfig
) -> dict[str, object]:
    """Answer the held-out requests with the trained expert and probe (no escalation), choose
    ``escalate_after`` from the dissent counts, and write ``policy.json``."""
    policy = ReflectionAlpha(ProbeReader.load(out / PROBE_FILE), DEFAULT_RISK_MAP)
    engine = GuardedLM.from_models(peft_model, tokenizer, alpha_policy=policy)
    groups: dict[str, list[PlannedRequest]] = {}
    for planned in holdout:
        groups.setdefault(json.dumps(planned.conversation.tools, sort_keys=True), []).append(
            planned
        )
    counts: dict[str, list[int]] = {"benign": [], "harmful": []}
    for planned_group in groups.values():
        for start in range(0, len(planned_group), build.batch_size):
            chunk = planned_group[start : start + build.batch_size]
            generations = engine.generate_batch(
                [list(p.conversation.messages) for p in chunk],
                tools=list(chunk[0].conversation.tools) or None,
                max_new_tokens=build.benign_tokens,
            )
            for planned, generation in zip(chunk, generations, strict=True):
                if generation.summary.alpha < DEFAULT_RISK_MAP.escalated_alpha:
                    counts[planned.label].append(dissents(generation))
    choice = choose_escalation(counts["benign"], counts["harmful"])
    risk_map = DEFAULT_RISK_MAP.model_copy(update={"escalate_after": choice.escalate_after})
    calibration = {
        "held_out_requests": len(holdout),
        "escalate_after": choice.escalate_after,
        "benign_reached": round(choice.benign_reached, 4),
        "harmful_reached": round(choice.harmful_reached, 4),
        "benign_read_below_high": choice.benign,
        "harmful_read_below_high": choice.harmful,
        "dissent_counts": choice.counts,
    }
    policy_record = {"risk_map": risk_map.model_dump(), "calibration": calibration}
    (out / POLICY_FILE).write_text(json.dumps(policy_record, indent=2) + "\n")
    logger.info("calibration: %s", {k: v for k, v in calibration.items() if k != "dissent_counts"})
    return calibration


def _train_probe(
    engine: GuardedLM,
    plan: Sequence[PlannedRequest],
    features: PromptFeatures,
    out: Path,
    base_name: str,
    build: BuildConfig,
) -> dict[str, object]:
    """Fit the risk probe on every planned request (in its context), harmful vs benign."""
    labels = torch.tensor([float(p.label == "harmful") for p in plan])
    x = probe_features(
        engine, [p.conversation for p in plan], features, batch_size=build.batch_size
    )
    cv_auc = cross_validated_auc(x, labels, features, seed=build.seed)
    reader = fit_probe(x, labels, features)
    reader.save(out / PROBE_FILE, metadata={"base": base_name, "cv_auc": f"{cv_auc:.4f}"})
    logger.info("probe: 5-fold AUC %.4f on %d prompts", cv_auc, len(labels))
    harmful = int(labels.sum())
    return {
        "features": str(features),
        "harmful": harmful,
        "benign": len(labels) - harmful,
        "cv_auc": round(cv_auc, 4),
    }
