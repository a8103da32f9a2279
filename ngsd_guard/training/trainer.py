"""The LoRA trainer: refusals by cross-entropy, benign anchors by distillation from the base.

Per batch, with ``m`` the loss mask of the harmful rows and ``P_base`` the base's own
next-token distribution (the same model with the adapter disabled, no gradient):

``loss = CE(refusal tokens) + distill_weight * mean_t KL(P_base,t || P_expert,t)``

where the KL runs over the benign rows from the last prompt position through the answer, in
fp32. The KL term is what keeps the expert's distribution close to the base's on benign text,
so that the divergence the gate watches stays low there.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .data import Example

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA and optimiser settings (paper: r=16, alpha=64, lr 2e-3, 2 epochs)."""

    r: int = 16
    lora_alpha: int = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 2e-3
    epochs: int = 2
    batch_size: int = 8
    distill_weight: float = 1.0
    max_length: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"`r` (={self.r}) must be at least 1")
        if self.epochs < 1:
            raise ValueError(f"`epochs` (={self.epochs}) must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"`lr` (={self.lr}) must be positive")
        if self.distill_weight < 0:
            raise ValueError(f"`distill_weight` (={self.distill_weight}) must be >= 0")


def wrap_lora(model: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel:
    """A peft model with a fresh LoRA adapter (deterministic under ``settings.seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def collate(
    examples: Sequence[Example], pad_id: int, max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (B, T), ``attention_mask``, the CE ``labels`` (-100 outside
    the trained refusal) and the ``distill`` mask of benign positions whose next-token
    distribution is distilled (the last prompt token through the last answer token but one)."""
    rows = [ex.input_ids[:max_length] for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    distill = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ex, ids) in enumerate(zip(examples, rows, strict=True)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        first = len(ex.prompt_ids) + ex.loss_start
        if ex.kind == "benign":
            # position t predicts token t+1: from the last prompt token to the answer's end
            distill[b, len(ex.prompt_ids) - 1 : n - 1] = True
        else:
            labels[b, first:n] = input_ids[b, first:n]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
        "distill": distill.to(device),
    }


def batch_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], distill_weight: float):
    """``(loss, ce, kl)`` for one batch; see the module docstring."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()  # (B, T, V)
    labels = batch["labels"]
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    has_ce = (shift_labels != -100).any()
    ce = (
        F.cross_entropy(shift_logits.reshape(-1, logits.size(-1)), shift_labels.reshape(-1))
        if has_ce
        else logits.new_zeros(())
    )
    kl = logits.new_zeros(())
    mask = batch["distill"]
    if distill_weight > 0 and mask.any():
        with torch.no_grad(), model.disable_adapter():
            teacher = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()[mask]  # (N, V)
        student = F.log_softmax(logits[mask], dim=-1)
        kl = F.kl_div(
            student, F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean"
        )
    return ce + distill_weight * kl, ce.detach(), kl.detach()


@dataclass
class TrainReport:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    history: list[dict[str, float]]
    settings: dict[str, object]


def train_lora(
    model: PreTrainedModel,
    examples: Sequence[Example],
    settings: LoraSettings,
    *,
    pad_id: int,
    log_every: int = 10,
) -> TrainReport:
    """Train the adapter of a peft ``model`` in place; deterministic under ``settings.seed``."""
    device = next(model.parameters()).device
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    order = list(range(len(examples)))
    steps_per_epoch = math.ceil(len(order) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            chunk = [examples[i] for i in order[start : start + settings.batch_size]]
            batch = collate(chunk, pad_id, settings.max_length, device)
            loss, ce, kl = batch_loss(model, batch, settings.distill_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            row = {
                "step": step,
                "epoch": epoch,
                "loss": loss.item(),
                "ce": ce.item(),
                "kl": kl.item(),
            }
            history.append(row)
            if step % log_every == 0:
                logger.info("step %d/%d %s", step, total, row)
            step += 1
    model.eval()
    losses = [h["loss"] for h in history]
    head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)
    tail = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)
    return TrainReport(step, time.perf_counter() - started, head, tail, history, asdict(settings))
