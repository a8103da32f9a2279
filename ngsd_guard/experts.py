"""The models behind the base and the expert, behind one small interface.

A :class:`Runner` turns token ids and a KV cache into fp32 next-token logits on the gate's
device, sliced to the shared vocabulary. Three experts:

- ``lora``: a peft LoRA adapter on the base weights (no second copy); the base runs through a
  module tree without the LoRA layers that shares every weight tensor.
- ``model``: a separate, smaller model of the same family, on its own device.
- ``prompted``: the base model itself, under a safety system prompt.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .errors import IncompatibleTokenizerError
from .features import PromptFeatures, capture_layers

ExpertKind = Literal["lora", "model", "prompted"]

SAFETY_PROMPT = (
    "You are a responsible and safe assistant. If a request could cause harm, such as "
    "violence, weapons, drugs, hacking, fraud, self-harm, hate or illegal activity, refuse "
    "briefly and politely: start with \"I'm sorry, but I can't help with that\" and do not "
    "give any harmful details. Otherwise, answer helpfully."
)

Message = dict[str, object]

LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of families whose logits are not the output layer's plain product with the
final hidden state (Gemma's soft-capping, Cohere's and Granite's scaling)."""


class ModelHandle:
    """One model in memory and the lock that its forwards hold.

    The lock makes one model safe to share between threads whatever the backend; every call
    has its own KV cache, so nothing else is shared.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.inner = model.get_base_model() if is_peft(model) else model
        parameters = inspect.signature(self.inner.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_logits = "logits_to_keep" in parameters

    @functools.cached_property
    def head(self) -> torch.nn.Module | None:
        """The output layer, when the model's logits are exactly ``head(h)`` with ``h`` its
        decoder's final hidden state (checked once, on three tokens); None otherwise."""
        head = self.inner.get_output_embeddings()
        config = getattr(self.inner, "config", None)
        if head is None or any(getattr(config, name, None) for name in LOGIT_POSTPROCESSING):
            return None
        ids = torch.arange(1, 4, device=self.device)[None]
        with torch.no_grad(), self.lock:
            whole = self.model(input_ids=ids, use_cache=False).logits
            hidden = self.inner.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            formed = head(hidden)
        if formed.shape != whole.shape or not torch.allclose(formed, whole, rtol=1e-3, atol=1e-3):
            return None
        return head


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft ``PeftModel`` (the adapter-carrying wrapper)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


_FORWARD_HOOK_REGISTRIES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def without_adapters(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The base model inside ``peft_model``, with every LoRA layer replaced by the layer it
    wraps. The module tree is new but every parameter is the same tensor: no second copy of the
    weights, and no adapter switch (a global state) between base and expert forwards.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    def strip(module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(module, BaseTunerLayer):
            return module.get_base_layer()
        clone = copy.copy(module)
        clone._modules = {name: strip(child) for name, child in module._modules.items()}
        # own copies of the hook registries: a hook added to the base tree later (the probe's
        # feature capture) must not fire in the adapter model's forwards
        for registry in _FORWARD_HOOK_REGISTRIES:
            if hasattr(module, registry):
                setattr(clone, registry, type(getattr(module, registry))(getattr(module, registry)))
        return clone

    return strip(peft_model.get_base_model())


@dataclass(frozen=True)
class Outputs:
    """One forward's outputs at every fed position: final hidden states and the output layer
    that maps them to logits, ``logits = head(h)``, formed a few positions at a time, or the
    logits themselves (``head`` None: a family whose logits are not that product)."""

    states: torch.Tensor  # (B, T, H) hidden states, or (B, T, V) fp32 logits when head is None
    head: torch.nn.Module | None
    vocab_size: int
    out_device: torch.device

    @torch.no_grad()
    def logits(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, V) fp32 logits at the (n,) ``rows`` and ``positions``."""
        device = self.states.device
        states = self.states[rows.to(device), positions.to(device)]
        if self.head is not None:
            states = self.head(states)
        return states[..., : self.vocab_size].to(self.out_device, torch.float32)


@dataclass
class Runner:
    """Logits of one side (base or expert): a model handle and the shared vocabulary size."""

    handle: ModelHandle
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
        features: PromptFeatures | None = None,
        spans: torch.Tensor | None = None,
        keep: int = 0,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids -> ((B, T', V) fp32 logits, (B, F) fp32 prompt features or None).

        ``keep`` > 0 computes the logits of the last ``keep`` positions only (T' = keep).
        ``features`` are pooled from this forward's hidden states (:mod:`ngsd_guard.features`),
        with ``spans`` (B, 2) the [start, end) positions of each row's last user message.
        ``adapter_names``: per row, the peft adapter to apply (``"__base__"``: none), for a
        batch that mixes base and LoRA-expert rows in one forward.
        """
        handle = self.handle
        device = handle.device
        options: dict[str, object] = {handle.cache_argument: cache}
        if keep and handle.keeps_logits:
            options["logits_to_keep"] = keep
        if adapter_names is not None:
            options["adapter_names"] = list(adapter_names)
        pooled = None
        with handle.lock:
            layers = features.layers if features is not None else ()
            with capture_layers(handle.model, layers) as states:
                out = handle.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=True,
                    **options,
                )
                if features is not None:
                    if spans is None:
                        raise ValueError("`features` need the `spans` of the last user message")
                    pooled = features.pool(states, spans.to(device)).to(self.out_device)
        logits = out.logits[:, -keep:] if keep else out.logits
        logits = logits[..., : self.vocab_size].to(self.out_device, torch.float32)
        return logits, pooled

    @torch.no_grad()
    def outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> Outputs:
        """(B, T) ids -> the outputs at every position, without forming the (B, T, V) logits
        where the model's head allows (:attr:`ModelHandle.head`)."""
        handle = self.handle
        head = handle.head
        if head is None:
            logits, _ = self.forward(
                input_ids, attention_mask, position_ids, cache, keep=input_ids.shape[1]
            )
            return Outputs(logits, None, self.vocab_size, self.out_device)
        device = handle.device
        with handle.lock:
            out = handle.inner.get_decoder()(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=True,
                **{handle.cache_argument: cache},
            )
        return Outputs(out.last_hidden_state, head, self.vocab_size, self.out_device)


@dataclass
class Expert:
    """The expert side: its runner, its kind, and the system prompt it decodes under."""

    runner: Runner
    kind: ExpertKind
    safety_prompt: str | None = None

    @property
    def joint_adapter(self) -> str | None:
        """For a LoRA expert, the adapter's name: the base's rows and the expert's can then
        share one forward (the base's rows with the adapter off). None for other kinds."""
        if self.kind != "lora":
            return None
        return str(self.runner.handle.model.active_adapter)

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
