"""The LoRA trainer: refusals by cross-entropy, benign anchors by distillation from the base.

Per batch, with ``P_base`` the base's own next-token distribution (the same model with the
adapter disabled, no gradient):

``loss = CE(refusal tokens) + distill_weight * mean_t KL(P_base,t || P_expert,t)``

where the KL runs over the benign rows from the last prompt position through the answer, in
fp32. The KL term is what keeps the expert's distribution close to the base's on benign text,
so that the divergence the gate watches stays low there.

With a ``teacher`` (a trained expert, e.g. one on every layer distilled into one on the upper
layers), the harmful rows are distilled from it instead of trained on the written refusals:

``loss = mean_t KL(P_teacher,t || P_expert,t) + distill_weight * mean_t KL(P_base,t || P_expert,t)``

with the first KL over the harmful rows from the last prompt position through the answer, so
the student takes the teacher's whole distribution where it refuses (its first word, which
the risk reading uses, and its recovery from a compliant prefix) while the benign anchors,
look-alikes included, pull it to the base. The rows of ``written_categories`` (self-harm:
the written replies point to help, where a teacher may answer with a bare refusal) keep the
cross-entropy on their written answers, and the two harmful terms add. With ``teach_benign``
the benign rows are distilled from the teacher too instead of from the base, so that the
student copies the teacher everywhere (``distill_weight`` then has no rows to weigh):

``loss = mean_t KL(P_teacher,t || P_expert,t)`` over every row but the written ones.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import ConfigError
from ..sources import SELF_HARM
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
    bf16: bool = False  # forwards under bf16 autocast (the losses stay fp32)
    first_layer: int = 0  # adapt decoder layers from this one on: an expert whose lower
    # layers are the base's verifies on its own layers only (ngsd_guard.experts.Trunk)
    teacher: str | None = None  # an expert adapter dir whose distributions the harmful rows
    # are distilled from instead of the written refusals (load_teacher)
    written_categories: tuple[str, ...] = (SELF_HARM,)  # harmful categories that keep the
    # cross-entropy on their written answers under a teacher
    teach_benign: bool = False  # the teacher distils the benign rows too, instead of the base

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"`r` (={self.r}) must be at least 1")
        if self.epochs < 1:
            raise ConfigError(f"`epochs` (={self.epochs}) must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"`lr` (={self.lr}) must be positive")
        if self.max_length < 2:
            raise ConfigError(f"`max_length` (={self.max_length}) must be at least 2")
        if self.distill_weight < 0:
            raise ConfigError(f"`distill_weight` (={self.distill_weight}) must be >= 0")
        if self.first_layer < 0:
            raise ConfigError(f"`first_layer` (={self.first_layer}) must be >= 0")
        if self.teach_benign and self.teacher is None:
            raise ConfigError("`teach_benign` needs a `teacher` to distil the benign rows from")


def wrap_lora(model: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel:
    """A peft model with a fresh LoRA adapter (deterministic under ``settings.seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    layers = model.config.num_hidden_layers
    if settings.first_layer >= layers:
        raise ConfigError(
            f"`first_layer` (={settings.first_layer}) must be below the model's {layers} layers"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=list(range(settings.first_layer, layers))
        if settings.first_layer
        else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_teacher(model: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """A frozen copy of ``model`` (the plain base) with the expert adapter of ``adapter_dir``
    merged in: the teacher that :func:`batch_loss` distils the harmful rows from."""
    from peft import PeftModel

    require_adapter(adapter_dir, "teacher")
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload()
    return merged.requires_grad_(False).eval()


def require_adapter(adapter_dir: str | Path, option: str) -> None:
    """Raise :class:`ConfigError`, naming ``option``, unless ``adapter_dir`` holds a peft
    adapter."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"`{option}` (={str(adapter_dir)!r}) holds no peft adapter")


def load_trainable_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """A peft model around ``model`` with the adapter of ``adapter_dir`` loaded trainable, to
    go on training an expert (its LoRA rank and targets are the adapter's own)."""
    from peft import PeftModel

    require_adapter(adapter_dir, "init_adapter")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def collate(
    examples: Sequence[Example],
    pad_id: int,
    max_length: int,
    device: torch.device,
    written: Container[str] = (),
    teach_benign: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (B, T), ``attention_mask``, the CE ``labels`` (-100 outside
    the trained refusal), the ``distill`` mask of benign positions whose next-token
    distribution is distilled from the base and the ``teach`` mask of harmful positions
    distilled from a teacher, if one is used (each: the last prompt token through the last
    answer token but one). Harmful rows of a category in ``written`` are never taught; with
    ``teach_benign`` the benign rows are taught instead of distilled from the base."""
    rows = [ex.input_ids[:max_length] for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    distill = torch.zeros((len(rows), width), dtype=torch.bool)
    teach = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ex, ids) in enumerate(zip(examples, rows, strict=True)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        first = len(ex.prompt_ids) + ex.loss_start
        if ex.kind == "benign":
            # position t predicts token t+1: from the last prompt token to the answer's end
            (teach if teach_benign else distill)[b, len(ex.prompt_ids) - 1 : n - 1] = True
        else:
            labels[b, first:n] = input_ids[b, first:n]
            teach[b, len(ex.prompt_ids) - 1 : n - 1] = ex.category not in written
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
        "distill": distill.to(device),
        "teach": teach.to(device),
    }


def _distilled(
    hidden: torch.Tensor, head: torch.nn.Module, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``mean_t KL(softmax(teacher_logits) || softmax(head(hidden)))`` over the (B, T) ``mask``
    of (B, T, H) ``hidden``; ``teacher_logits``: (N, V) at the N masked positions. fp32."""
    student = F.log_softmax(head(hidden[mask]).float(), dim=-1)  # (N, V)
    target = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


@dataclass
class BatchLoss:
    """One batch's loss and its terms (fp32 scalars; ``loss`` keeps its graph)."""

    loss: torch.Tensor
    ce: torch.Tensor  # cross-entropy on the written refusals (without a teacher: every one)
    teacher_kl: torch.Tensor  # KL from the teacher on the taught rows
    kl: torch.Tensor  # KL from the base on the benign rows


def batch_loss(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    distill_weight: float,
    teacher: PreTrainedModel | None = None,
) -> BatchLoss:
    """The loss of one batch of a peft ``model`` (see the module docstring): the CE on the
    refusals of the rows no ``teacher`` teaches (without one, every harmful row), the KL from
    ``teacher`` on the rows it does, and ``distill_weight`` times the KL from the base.

    The output layer runs only where a loss is taken (the refusal tokens' predecessors and the
    distilled positions), and each teacher only over the rows it teaches, which saves the full
    ``(B, T, V)`` logits and a teacher's pass over the other rows.
    """
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    head = model.get_output_embeddings()
    decoder = model.get_base_model().get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state  # (B, T, H)
    zero = hidden.new_zeros((), dtype=torch.float32)
    taught = batch["teach"] if teacher is not None else torch.zeros_like(batch["teach"])  # (B, T)
    taught_rows = taught.any(dim=1)  # (B,)
    targets = labels[:, 1:].masked_fill(taught_rows[:, None], -100)  # (B, T-1): t predicts t+1
    ce_at = F.pad(targets != -100, (0, 1))  # (B, T)
    ce = (
        F.cross_entropy(head(hidden[ce_at]).float(), targets[targets != -100])
        if ce_at.any()
        else zero
    )
    teacher_kl = zero
    if taught_rows.any():
        with torch.no_grad():
            out = teacher.get_decoder()(
                input_ids=ids[taught_rows], attention_mask=attention[taught_rows]
            )
            logits = teacher.get_output_embeddings()(out.last_hidden_state[taught[taught_rows]])
        teacher_kl = _distilled(hidden, head, logits, taught)
    kl = zero
    mask = batch["distill"]  # (B, T)
    rows = mask.any(dim=1)  # (B,)
    if distill_weight > 0 and rows.any():
        with torch.no_grad(), model.disable_adapter():
            base_hidden = decoder(input_ids=ids[rows], attention_mask=attention[rows])
            base_logits = head(base_hidden.last_hidden_state[mask[rows]])  # (N, V)
        kl = _distilled(hidden, head, base_logits, mask)
    return BatchLoss(
        ce + teacher_kl + distill_weight * kl, ce.detach(), teacher_kl.detach(), kl.detach()
    )


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, group: int = 32
) -> list[list[int]]:
    """One epoch's batches of indices into ``lengths``: shuffle, cut into runs of
    ``group * batch_size``, sort each run by length, cut into batches, shuffle the batches
    (as transformers' ``group_by_length``). Rows of one batch have similar lengths, so little
    of a padded batch is padding; every index appears exactly once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = group * batch_size
    batches = []
    for start in range(0, len(order), span):
        run = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    rng.shuffle(batches)
    return batches


CHECKPOINT_FILE = "lora-training.pt"


@dataclass
class Checkpoint:
    """Where a LoRA training saves its state every ``every`` steps (the trainable weights,
    the optimiser, the schedule, the RNG and the loss history), so that a run killed midway
    goes on from its last save: the resumed run equals an uninterrupted one."""

    directory: Path
    every: int = 50

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"`checkpoint_every` (={self.every}) must be at least 1")

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a run killed while saving keeps the previous save."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)

    def load(self, run: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state, or None; a ConfigError when it was saved by a different run
        (``run``: the settings and the number of examples)."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        if state["run"] != run:
            raise ConfigError(
                f"the checkpoint in {str(self.directory)!r} is of another run "
                f"({state['run']} against {run}); remove it or choose another directory"
            )
        return state


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
    checkpoint: Checkpoint | None = None,
    teacher: PreTrainedModel | None = None,
) -> TrainReport:
    """Train the adapter of a peft ``model`` in place; deterministic under ``settings.seed``.
    With ``checkpoint``, go on from its last save, and save every ``checkpoint.every`` steps.
    ``teacher`` (:func:`load_teacher` of ``settings.teacher``) teaches the harmful rows."""
    if (teacher is None) != (settings.teacher is None):
        raise ConfigError(
            f"`teacher` must be given exactly when `settings.teacher` (={settings.teacher!r}) is"
        )
    device = next(model.parameters()).device
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    lengths = [min(len(ex.input_ids), settings.max_length) for ex in examples]
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[dict[str, float]] = []
    earlier = 0.0  # seconds spent before the checkpoint
    run = {"settings": asdict(settings), "examples": len(examples)}
    saved = checkpoint.load(run) if checkpoint is not None else None
    if saved is not None:
        with torch.no_grad():
            for name, value in saved["weights"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        history = list(saved["history"])
        earlier = float(saved.get("seconds", 0.0))
        logger.info("resuming from step %d (%s)", len(history), checkpoint.path)
    done = len(history)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    model.train()
    started = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        for indices in length_grouped_batches(lengths, settings.batch_size, rng):
            if step < done:  # trained before the checkpoint; the batch order is replayed
                step += 1
                continue
            chunk = [examples[i] for i in indices]
            batch = collate(
                chunk,
                pad_id,
                settings.max_length,
                device,
                settings.written_categories,
                settings.teach_benign,
            )
            with autocast:
                terms = batch_loss(model, batch, settings.distill_weight, teacher)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            row = {
                "step": step,
                "epoch": epoch,
                "loss": terms.loss.item(),
                "ce": terms.ce.item(),
                "kl": terms.kl.item(),
            }
            if teacher is not None:
                row["teacher_kl"] = terms.teacher_kl.item()
            history.append(row)
            if step % log_every == 0:
                logger.info("step %d/%d %s", step, total, row)
            step += 1
            if checkpoint is not None and (step % checkpoint.every == 0 or step == total):
                checkpoint.save(
                    {
                        "run": run,
                        "weights": {n: p.detach().clone() for n, p in named.items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "history": history,
                        "seconds": earlier + time.perf_counter() - started,
                    }
                )
    model.eval()
    losses = [h["loss"] for h in history]
    head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)
    tail = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)
    seconds = earlier + time.perf_counter() - started
    return TrainReport(step, seconds, head, tail, history, asdict(settings))
