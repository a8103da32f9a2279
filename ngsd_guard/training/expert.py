"""``train_expert``: data, probe, LoRA, and the artefacts, in one deterministic run."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .data import BuildConfig, build_dataset, load_seeds, save_examples
from .probe import cross_validated_auc, fit_probe, prompt_hidden
from .trainer import LoraSettings, train_lora, wrap_lora

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.safetensors"
RECORD_FILE = "training.json"


def _probe_prompts(data_dir: Path, harmful: list[str]) -> tuple[list[str], list[int]]:
    """Harmful seeds vs every benign training prompt (AlpacaEval 100+ and borderline)."""
    benign = load_seeds(data_dir, benign_limit=10_000).benign
    return harmful + benign, [1] * len(harmful) + [0] * len(benign)


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
    data_dir: str | Path,
    out: str | Path,
    base_name: str,
    build: BuildConfig | None = None,
    lora: LoraSettings | None = None,
    benign_limit: int = 300,
    harmful_limit: int | None = None,
    probe: bool = True,
    examples_path: str | Path | None = None,
    command: str = "",
) -> dict[str, object]:
    """Train the probe (on the plain base) and a LoRA expert; write the adapter dir, the probe
    and ``training.json`` under ``out``. Returns the record."""
    build = build or BuildConfig()
    lora = lora or LoraSettings(seed=build.seed)
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(build.seed)
    torch.manual_seed(build.seed)
    started = time.perf_counter()
    model.eval()
    seeds = load_seeds(data_dir, benign_limit=benign_limit, harmful_limit=harmful_limit)
    record: dict[str, object] = {"base": base_name, "command": command}

    if probe:
        prompts, labels = _probe_prompts(data_dir, seeds.harmful)
        features = prompt_hidden(model, tokenizer, prompts, batch_size=build.batch_size)
        target = torch.tensor(labels, dtype=torch.float32)
        cv_auc = cross_validated_auc(features, target, seed=build.seed)
        reader = fit_probe(features, target)
        reader.save(out / PROBE_FILE, metadata={"base": base_name, "cv_auc": f"{cv_auc:.4f}"})
        record["probe"] = {"harmful": sum(labels), "benign": len(labels) - sum(labels)}
        record["probe"]["cv_auc"] = round(cv_auc, 4)
        logger.info("probe: 5-fold AUC %.4f on %d prompts", cv_auc, len(labels))

    dataset = build_dataset(model, tokenizer, seeds, build)
    record["data"] = dataset.stats
    if examples_path is not None:
        save_examples(dataset, examples_path, tokenizer)
    peft_model = wrap_lora(model, lora)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = train_lora(peft_model, dataset.examples, lora, pad_id=pad)
    save_adapter_fp16(peft_model, out, base_name)
    record["training"] = {
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "first_loss": round(report.first_loss, 4),
        "last_loss": round(report.last_loss, 4),
        "lora": report.settings,
        "device": str(next(model.parameters()).device),
    }
    record["build"] = asdict(build)
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
