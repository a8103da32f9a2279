"""The models behind the base and the expert, behind one small interface.

A :class:`Runner` turns token ids and a KV cache into fp32 next-token logits on the gate's
device, sliced to the shared vocabulary. Three experts:

- ``lora``: a peft LoRA adapter on the base weights (no second copy); the base runs through a
  module tree without the LoRA layers that shares every weight tensor. When the adapter leaves
  the first ``L`` decoder layers alone, the expert's hidden states there are the base's, and
  its verifications run only the layers from ``L`` on (:class:`Trunk`), fed the base's.
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
        self.dtype = next(model.parameters()).dtype
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


@dataclass(frozen=True)
class Forward:
    """What one forward returns."""

    logits: torch.Tensor  # (B, T', V) fp32: the last ``keep`` positions' (all when keep is 0)
    features: torch.Tensor | None  # (B, F) fp32 prompt features, if asked
    hidden: torch.Tensor | None  # (B, T, H) the states entering decoder layer ``hidden_at``


@dataclass
class Runner:
    """Logits of one side (base or expert): a model handle and the shared vocabulary size."""

    handle: ModelHandle
    vocab_size: int
    out_device: torch.device
    first_layer = 0  # the decoder layer its forwards start from (see :class:`Trunk`)

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
        hidden_at: int = 0,
    ) -> Forward:
        """(B, T) ids -> the logits, and the prompt features and hidden states if asked.

        ``keep`` > 0 computes the logits of the last ``keep`` positions only (T' = keep).
        ``features`` are pooled from this forward's hidden states (:mod:`ngsd_guard.features`),
        with ``spans`` (B, 2) the [start, end) positions of each row's last user message.
        ``adapter_names``: per row, the peft adapter to apply (``"__base__"``: none), for a
        batch that mixes base and LoRA-expert rows in one forward. ``hidden_at`` > 0 keeps
        the states entering decoder layer ``hidden_at`` (counted from 0), on the model's device.
        """
        handle = self.handle
        device = handle.device
        options: dict[str, object] = {handle.cache_argument: cache}
        if keep and handle.keeps_logits:
            options["logits_to_keep"] = keep
        if adapter_names is not None:
            options["adapter_names"] = list(adapter_names)
        pooled = hidden = None
        with handle.lock:
            layers = features.layers if features is not None else ()
            with capture_layers(
                handle.model, (*layers, hidden_at) if hidden_at else layers
            ) as states:
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
                if hidden_at:
                    hidden = states[hidden_at]
        logits = out.logits[:, -keep:] if keep else out.logits
        logits = logits[..., : self.vocab_size].to(self.out_device, torch.float32)
        return Forward(logits, pooled, hidden)

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
            logits = self.forward(
                input_ids, attention_mask, position_ids, cache, keep=input_ids.shape[1]
            ).logits
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


def first_adapted_layer(peft_model: torch.nn.Module) -> int:
    """The first decoder layer that a peft model's adapter changes, so that the expert's states
    entering it are the base's; 0 when the adapter changes anything outside the decoder's
    layers or the model has no Llama-style decoder."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    blocks = getattr(peft_model.get_base_model().get_decoder(), "layers", None)
    if blocks is None:
        return 0
    inside = {id(m) for block in blocks for m in block.modules()}
    adapted = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    if not adapted or any(id(m) not in inside for m in adapted):
        return 0
    for index, block in enumerate(blocks):
        if any(isinstance(m, BaseTunerLayer) for m in block.modules()):
            return index
    return 0


def _upper_decoder(decoder: torch.nn.Module, first: int) -> torch.nn.Module | None:
    """``decoder`` from layer ``first`` on, as a module tree that shares every parameter: its
    attention layers count from ``first``, so its cache holds only those layers. None for a
    decoder whose layers do not say their index (``self_attn.layer_idx``)."""
    blocks = []
    for block in decoder.layers[first:]:
        attention = getattr(block, "self_attn", None)
        if not isinstance(getattr(attention, "layer_idx", None), int):
            return None
        clone = copy.copy(block)
        clone._modules = dict(block._modules)
        clone._modules["self_attn"] = copy.copy(attention)
        clone._modules["self_attn"].layer_idx = attention.layer_idx - first
        blocks.append(clone)
    upper = copy.copy(decoder)
    upper._modules = {**decoder._modules, "layers": torch.nn.ModuleList(blocks)}
    upper.config = copy.copy(decoder.config)
    upper.config.num_hidden_layers = len(blocks)
    return upper


@dataclass
class Trunk:
    """A LoRA expert's decoder layers from ``first_layer`` on (the layers its adapter changes),
    fed the base's states entering that layer: the same logits as the whole expert, for about
    ``1 - first_layer / layers`` of its cost, with a cache of those layers only."""

    runner: Runner  # the whole expert's
    first_layer: int
    decoder: torch.nn.Module

    @property
    def out_device(self) -> torch.device:
        return self.runner.out_device

    @classmethod
    def of(cls, expert: Runner, base: Runner) -> Trunk | None:
        """The trunk of a LoRA ``expert`` over ``base``, when its adapter leaves the first
        layers alone and a three-token check finds the logits equal; None otherwise."""
        handle = expert.handle
        first = first_adapted_layer(handle.model) if is_peft(handle.model) else 0
        decoder = _upper_decoder(handle.inner.get_decoder(), first) if first else None
        if decoder is None or handle.head is None:
            return None
        trunk = cls(expert, first, decoder)
        ids = torch.arange(1, 4)[None]
        mask, positions = torch.ones_like(ids), torch.arange(3)[None]
        whole = expert.outputs(ids, mask, positions, DynamicCache())
        below = base.forward(ids, mask, positions, DynamicCache(), keep=1, hidden_at=first)
        assert below.hidden is not None
        formed = trunk.outputs(below.hidden, mask, positions, DynamicCache())
        every = (torch.zeros(3, dtype=torch.long), torch.arange(3))
        if not torch.allclose(formed.logits(*every), whole.logits(*every), rtol=1e-3, atol=1e-3):
            return None
        return trunk

    @torch.no_grad()
    def outputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> Outputs:
        """(B, T, H) states entering layer ``first_layer`` -> the outputs at every position."""
        handle = self.runner.handle
        device = handle.device
        with handle.lock:
            out = self.decoder(
                inputs_embeds=hidden.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=True,
                **{handle.cache_argument: cache},
            )
        runner = self.runner
        return Outputs(out.last_hidden_state, handle.head, runner.vocab_size, runner.out_device)


@dataclass
class Expert:
    """The expert side: its runner, its kind, and the system prompt it decodes under."""

    runner: Runner
    kind: ExpertKind
    safety_prompt: str | None = None
    trunk: Trunk | None = None  # a LoRA expert's upper layers, when its adapter allows

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
