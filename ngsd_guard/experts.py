"""The models behind the base and the expert, behind one small interface.

A :class:`Runner` turns token ids and a KV cache into fp32 next-token logits on the gate's
device, sliced to the shared vocabulary. Three experts:

- ``lora``: a peft LoRA adapter on the base weights (no second copy); the base runs with the
  adapter disabled, the expert with it enabled.
- ``model``: a separate, smaller model of the same family, on its own device.
- ``prompted``: the base model itself, under a safety system prompt.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .errors import IncompatibleTokenizerError

ExpertKind = Literal["lora", "model", "prompted"]

SAFETY_PROMPT = (
    "You are a responsible and safe assistant. If a request could cause harm, such as "
    "violence, weapons, drugs, hacking, fraud, self-harm, hate or illegal activity, refuse "
    "briefly and politely: start with \"I'm sorry, but I can't help with that\" and do not "
    "give any harmful details. Otherwise, answer helpfully."
)

Message = dict[str, object]


class ModelHandle:
    """One model in memory, its lock, and (for peft models) whether the adapter is enabled.

    Every forward holds the lock, so several threads may share one model safely, and the
    adapter switch of one thread never leaks into another's forward.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self._adapter_enabled: bool | None = True if _is_peft(model) else None
        inner = model.get_base_model() if _is_peft(model) else model
        parameters = inspect.signature(inner.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_logits = "logits_to_keep" in parameters

    def set_adapter(self, enabled: bool | None) -> None:
        """Enable or disable the LoRA layers (lock held by the caller)."""
        if enabled is None or self._adapter_enabled is None or enabled == self._adapter_enabled:
            return
        if enabled:
            self.model.base_model.enable_adapter_layers()
        else:
            self.model.base_model.disable_adapter_layers()
        self._adapter_enabled = enabled


def _is_peft(model: PreTrainedModel) -> bool:
    return hasattr(model, "peft_config")


@dataclass
class Runner:
    """Logits of one side (base or expert): a model handle, the adapter state, the vocab."""

    handle: ModelHandle
    adapter: bool | None
    vocab_size: int
    out_device: torch.device

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        *,
        hidden: bool = False,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids -> ((B, T, V) fp32 logits, (B, H) fp32 last hidden state or None).

        ``last_only`` computes the logits of the last position only: (B, 1, V).
        """
        handle = self.handle
        device = handle.device
        options: dict[str, object] = {handle.cache_argument: cache}
        if last_only and handle.keeps_logits:
            options["logits_to_keep"] = 1
        with handle.lock:
            handle.set_adapter(self.adapter)
            out = handle.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=True,
                output_hidden_states=hidden,
                **options,
            )
        logits = out.logits[..., : self.vocab_size].to(self.out_device, torch.float32)
        last_hidden = (
            out.hidden_states[-1][:, -1].to(self.out_device, torch.float32) if hidden else None
        )
        return logits, last_hidden


@dataclass
class Expert:
    """The expert side: its runner, its kind, and the system prompt it decodes under."""

    runner: Runner
    kind: ExpertKind
    safety_prompt: str | None = None

    def messages(self, messages: Sequence[Message]) -> list[Message]:
        """The conversation the expert sees: the base's, or it under the safety prompt."""
        if self.safety_prompt is None:
            return list(messages)
        if messages and messages[0].get("role") == "system":
            first = {**messages[0], "content": f"{self.safety_prompt}\n\n{messages[0]['content']}"}
            return [first, *messages[1:]]
        return [{"role": "system", "content": self.safety_prompt}, *messages]


def shared_vocab_size(
    base: PreTrainedTokenizerBase, expert: PreTrainedTokenizerBase | None = None
) -> int:
    """The number of logits both sides keep: the tokenizer's length (padded rows dropped).

    Raises IncompatibleTokenizerError when the expert's tokenizer maps tokens differently.
    """
    if expert is not None and expert.get_vocab() != base.get_vocab():
        only_base = len(set(base.get_vocab()) - set(expert.get_vocab()))
        only_expert = len(set(expert.get_vocab()) - set(base.get_vocab()))
        raise IncompatibleTokenizerError(
            f"the expert's tokenizer differs from the base's ({len(expert)} vs {len(base)} "
            f"tokens, {only_base} only in the base, {only_expert} only in the expert); NGSD "
            "needs an expert of the same model family that shares the tokenizer"
        )
    return len(base)
