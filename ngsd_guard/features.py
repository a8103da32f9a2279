"""What a risk probe reads from the prefills: the base's hidden states, pooled, and the
expert's first disagreement with the base.

A :class:`PromptFeatures` names its terms as ``POOL@LAYER`` joined by ``+``:

* ``last@L``: the base's hidden state at the last prompt token after layer ``L``;
* ``mean@L``: the mean over the tokens of the last user message (where a request sits, also
  inside a RAG template or after earlier turns) after layer ``L``;
* ``tv@0``: one column, ``D_0 = 1/2 sum_v |p_b(v) - p_e(v)|``, the total variation between
  the base's and the expert's next-token distributions right after the prompt (decoding step
  0): the safety expert's own first reading of the request.

Layer ``L`` counts decoder layers from 1, as transformers' ``hidden_states[L]`` does, and
``L`` equal to the number of layers is the final, normed output (``hidden_states[-1]``). The
states are captured by forward hooks during the prefills that decoding runs anyway, so reading
them costs no extra forward; the features are ``(B, F)`` fp32 with ``F = hidden x terms`` for
the hidden-state terms, plus 1 for ``tv@0``, in the order the terms are named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .divergence import total_variation
from .errors import ConfigError

POOLS = ("last", "mean")
FIRST_DIVERGENCE = ("tv", 0)
"""The ``tv@0`` term: the base/expert total variation at decoding step 0."""


@dataclass(frozen=True)
class PromptFeatures:
    """What a probe reads from the prefills (pooled hidden states, ``D_0``); see the module
    docstring.

    >>> PromptFeatures.parse("last@30+mean@18+tv@0").terms
    (('last', 30), ('mean', 18), ('tv', 0))
    """

    terms: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ConfigError("`PromptFeatures` needs at least one term, e.g. 'last@30'")
        for pool, layer in self.terms:
            if (pool, layer) != FIRST_DIVERGENCE and (pool not in POOLS or layer < 1):
                raise ConfigError(
                    f"feature term (={pool}@{layer}) must be last@L or mean@L with L >= 1, or tv@0"
                )

    @classmethod
    def parse(cls, text: str) -> PromptFeatures:
        terms = []
        for term in text.split("+"):
            pool, _, layer = term.strip().partition("@")
            if not layer.isdigit():
                raise ConfigError(f"feature term (={term!r}) must look like 'last@30' or 'mean@18'")
            terms.append((pool, int(layer)))
        return cls(tuple(terms))

    def __str__(self) -> str:
        return "+".join(f"{pool}@{layer}" for pool, layer in self.terms)

    @property
    def layers(self) -> tuple[int, ...]:
        """The base's decoder layers the hidden-state terms read."""
        return tuple(sorted({layer for pool, layer in self.terms if pool in POOLS}))

    @property
    def reads_expert(self) -> bool:
        """Whether a term (``tv@0``) needs the expert's prefill as well as the base's."""
        return FIRST_DIVERGENCE in self.terms

    def with_first_divergence(self) -> PromptFeatures:
        """These terms plus ``tv@0`` (last), if they lack it."""
        return self if self.reads_expert else PromptFeatures((*self.terms, FIRST_DIVERGENCE))

    def pool(self, states: dict[int, torch.Tensor], spans: torch.Tensor) -> torch.Tensor:
        """The hidden-state terms, in order: ``states[L]``: (B, T, H) after layer L;
        ``spans``: (B, 2) [start, end) token indices of each row's last user message, in the
        same (padded) positions -> (B, H x hidden terms) fp32."""
        if not self.layers:
            return torch.zeros((len(spans), 0), device=spans.device)
        positions = torch.arange(next(iter(states.values())).shape[1], device=spans.device)
        inside = (positions >= spans[:, :1]) & (positions < spans[:, 1:])  # (B, T)
        weights = inside.float() / inside.sum(-1, keepdim=True).clamp_min(1)
        parts = []
        for pool, layer in self.terms:
            if pool not in POOLS:
                continue
            hidden = states[layer].float()
            if pool == "last":
                parts.append(hidden[:, -1])
            else:
                parts.append(torch.einsum("bt,bth->bh", weights.to(hidden.device), hidden))
        return torch.cat(parts, -1)

    def assemble(self, pooled: torch.Tensor, first_divergence: torch.Tensor | None) -> torch.Tensor:
        """The full (B, F) features: ``pooled`` (B, H x hidden terms) from :meth:`pool`, with
        ``first_divergence`` (B,) ``D_0`` put where ``tv@0`` is named (None: not read)."""
        if not self.reads_expert:
            return pooled
        if first_divergence is None:
            raise ConfigError(
                f"the prompt features {self} read the expert (tv@0), but there is no expert"
            )
        hidden = pooled.shape[-1] // max(1, len(self.terms) - 1)
        parts, start = [], 0
        for term in self.terms:
            if term == FIRST_DIVERGENCE:
                parts.append(first_divergence.to(pooled).reshape(-1, 1))
            else:
                parts.append(pooled[:, start : start + hidden])
                start += hidden
        return torch.cat(parts, -1)


def first_divergence(base_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """``D_0`` of ``tv@0``: (B, V) next-token logits of the base and the expert after the
    prompt -> (B,) fp32 total variation of their softmaxes."""
    return total_variation(base_logits.float().softmax(-1), expert_logits.float().softmax(-1))


@contextlib.contextmanager
def capture_layers(
    model: torch.nn.Module, layers: tuple[int, ...]
) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks that store the (B, T, H) output after each decoder layer in ``layers``
    (the last one: after the final norm) into the yielded dict, for one forward."""
    if not layers:
        yield {}
        return
    decoder = model.get_decoder()
    blocks = getattr(decoder, "layers", None)
    if blocks is None or not hasattr(decoder, "norm"):
        raise ConfigError(
            f"{type(model).__name__} has no decoder `layers` and `norm`; probe features need a "
            "Llama-style decoder"
        )
    count = len(blocks)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        if layer > count:
            raise ConfigError(f"feature layer (={layer}) exceeds the model's {count} layers")
        module = decoder.norm if layer == count else blocks[layer - 1]

        def hook(_module, _inputs, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
