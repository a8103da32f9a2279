"""What a risk probe reads from the base's prefill: hidden states, pooled.

A :class:`PromptFeatures` names its terms as ``POOL@LAYER`` joined by ``+``:

* ``last@L``: the hidden state at the last prompt token after layer ``L``;
* ``mean@L``: the mean over the tokens of the last user message (where a request sits, also
  inside a RAG template or after earlier turns) after layer ``L``.

Layer ``L`` counts decoder layers from 1, as transformers' ``hidden_states[L]`` does, and
``L`` equal to the number of layers is the final, normed output (``hidden_states[-1]``). The
states are captured by forward hooks during the prefill that decoding runs anyway, so reading
them costs no extra forward; the features are ``(B, F)`` fp32 with ``F = terms x hidden``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import ConfigError

POOLS = ("last", "mean")


@dataclass(frozen=True)
class PromptFeatures:
    """The pooled hidden states a probe reads; see the module docstring.

    >>> PromptFeatures.parse("last@30+mean@18").terms
    (('last', 30), ('mean', 18))
    """

    terms: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ConfigError("`PromptFeatures` needs at least one term, e.g. 'last@30'")
        for pool, layer in self.terms:
            if pool not in POOLS or layer < 1:
                raise ConfigError(
                    f"feature term (={pool}@{layer}) must be last@L or mean@L with L >= 1"
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
        return tuple(sorted({layer for _, layer in self.terms}))

    def pool(self, states: dict[int, torch.Tensor], spans: torch.Tensor) -> torch.Tensor:
        """``states[L]``: (B, T, H) after layer L; ``spans``: (B, 2) [start, end) token indices
        of each row's last user message, in the same (padded) positions -> (B, F) fp32."""
        positions = torch.arange(next(iter(states.values())).shape[1], device=spans.device)
        inside = (positions >= spans[:, :1]) & (positions < spans[:, 1:])  # (B, T)
        weights = inside.float() / inside.sum(-1, keepdim=True).clamp_min(1)
        parts = []
        for pool, layer in self.terms:
            hidden = states[layer].float()
            if pool == "last":
                parts.append(hidden[:, -1])
            else:
                parts.append(torch.einsum("bt,bth->bh", weights.to(hidden.device), hidden))
        return torch.cat(parts, -1)


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
