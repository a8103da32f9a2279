"""``train_expert``: data, probe, LoRA, and the artefacts, in one deterministic run."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..contexts import Conversation
from ..features import PromptFeatures
from ..guarded import GuardedLM
from ..reflection import POLICY_FILE, ProbeReader
from .calibrate import calibrate as calibrate_policy
from .calibrate import is_holdout, split_holdout
from .data import BuildConfig, Example, PlannedRequest, build_dataset, save_examples
from .probe import cross_validated_auc, fit_probe, probe_features
from .trainer import (
    Checkpoint,
    LoraSettings,
    load_teacher,
    load_trainable_adapter,
    require_adapter,
    train_lora,
    wrap_lora,
)

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
    examples: Sequence[Example] | None = None,
    init_adapter: str | Path | None = None,
    checkpoint: Checkpoint | None = None,
    command: str = "",
) -> dict[str, object]:
    """Train the probe (on the plain base; ``probe`` names its features, None skips it) and
    a LoRA expert from planned requests (see :func:`~ngsd_guard.training.data.plan_requests`),
    or go on training the adapter in ``init_adapter`` (whose probe and policy are copied to
    ``out`` when ``probe`` is None, and whose ``training.json`` becomes the record's
    ``init_record``); then, with ``calibrate``, choose the alpha escalation on
    the held-out slice of the plan (:mod:`~ngsd_guard.training.calibrate`); write the adapter
    dir, the probe, ``policy.json`` and ``training.json`` under ``out``. Returns the record.

    The held-out slice never trains, so that ``calibrate-expert`` can choose the escalation
    later. ``examples`` (from :func:`~ngsd_guard.training.data.load_examples`) replaces
    building the data; those of held-out requests are dropped. ``checkpoint``: where the LoRA
    training saves its state, and goes on from (:class:`~ngsd_guard.training.trainer.Checkpoint`).
    """
    init_dir = None if init_adapter is None else Path(init_adapter)
    if init_dir is not None:
        require_adapter(init_dir, "init_adapter")  # before hours of data building
    if lora is not None and lora.teacher is not None:
        require_adapter(lora.teacher, "teacher")
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

    if init_dir is not None and probe is None:
        for name in (PROBE_FILE, POLICY_FILE):
            if (init_dir / name).is_file():
                shutil.copyfile(init_dir / name, out / name)
    calibrate = calibrate and (probe is not None or (out / PROBE_FILE).is_file())
    plan, holdout = split_holdout(plan)
    record: dict[str, object] = {"base": base_name, "command": command}
    if init_dir is not None and (init_dir / RECORD_FILE).is_file():
        # The adapter's history: the record of the run this one goes on from.
        record["init_record"] = json.loads((init_dir / RECORD_FILE).read_text())
    if probe is not None:
        record["probe"] = train_probe(
            engine, plan, probe, out, base_name=base_name, batch_size=build.batch_size
        )

    if examples is None:
        dataset = build_dataset(model, tokenizer, plan, render, build)
        if examples_path is not None:
            save_examples(dataset, examples_path, tokenizer)
        built, stats = dataset.examples, dataset.stats
    else:
        built = [ex for ex in examples if not is_holdout(ex.prompt)]
        stats = {"loaded_examples": len(examples), "held_out": len(examples) - len(built)}
    stats["held_out_for_calibration"] = len(holdout)
    trainable = [ex for ex in built if len(ex.input_ids) <= lora.max_length]
    stats["dropped_over_max_length"] = len(built) - len(trainable)
    record["data"] = stats
    teacher = None if lora.teacher is None else load_teacher(model, lora.teacher)
    peft_model = (
        wrap_lora(model, lora) if init_dir is None else load_trainable_adapter(model, init_dir)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = train_lora(
        peft_model, trainable, lora, pad_id=pad, checkpoint=checkpoint, teacher=teacher
    )
    del teacher
    save_adapter_fp16(peft_model, out, base_name)
    record["training"] = {
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "first_loss": round(report.first_loss, 4),
        "last_loss": round(report.last_loss, 4),
        "lora": report.settings,
        "init_adapter": None if init_dir is None else str(init_dir),
        "device": str(next(model.parameters()).device),
    }
    if calibrate and holdout:
        engine = GuardedLM.from_models(peft_model, tokenizer)
        result = calibrate_policy(
            engine, ProbeReader.load(out / PROBE_FILE), holdout, batch_size=build.batch_size
        )
        result.save(out)
        record["calibration"] = result.summary()
    if examples is None:  # loaded examples were built by the run that saved them
        record["build"] = asdict(build)
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def train_probe(
    engine: GuardedLM,
    plan: Sequence[PlannedRequest],
    features: PromptFeatures,
    out: str | Path,
    *,
    base_name: str,
    batch_size: int = 32,
) -> dict[str, object]:
    """Fit the risk probe on every planned request (in its context), harmful vs benign, and
    write it to ``out/probe.safetensors``; the record gives its held-out AUC, with folds
    grouped by request."""
    labels = torch.tensor([float(p.label == "harmful") for p in plan])
    x = probe_features(engine, [p.conversation for p in plan], features, batch_size=batch_size)
    cv_auc = cross_validated_auc(x, labels, features, groups=[p.conversation.request for p in plan])
    reader = fit_probe(x, labels, features)
    reader.save(Path(out) / PROBE_FILE, metadata={"base": base_name, "cv_auc": f"{cv_auc:.4f}"})
    logger.info("probe: 5-fold AUC %.4f on %d prompts", cv_auc, len(labels))
    harmful = int(labels.sum())
    return {
        "features": str(features),
        "harmful": harmful,
        "benign": len(labels) - harmful,
        "cv_auc": round(cv_auc, 4),
    }
