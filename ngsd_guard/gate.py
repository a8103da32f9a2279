"""The single neuron that watches the divergence and fires when the expert should step in.

Every gate is batched: its state is a dict of ``(B,)`` fp32 tensors on the device, and
``step`` updates all rows at once with tensor operations (no ``.item()``, no Python branch
on a tensor). NGSD, arXiv 2602.02027, Sec. 3.2.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import GateConfig

GateState = dict[str, torch.Tensor]


class Gate(Protocol):
    """``step(state, D_t) -> (state', potential, spiked)``, all tensors of shape (B,).

    ``potential(state)`` is the value compared with the threshold, as last left by ``step``.
    """

    def initial_state(
        self, rows: int, device: torch.device, potential: torch.Tensor | None = None
    ) -> GateState: ...

    def potential(self, state: GateState) -> torch.Tensor: ...

    def step(
        self, state: GateState, divergence: torch.Tensor
    ) -> tuple[GateState, torch.Tensor, torch.Tensor]: ...


def _zeros(rows: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.float32, device=device)


class LIFGate:
    """Leaky integrate-and-fire with a soft reset.

    ``v_t = (1 - 1/tau) v_{t-1} + D_t``; spike when ``v_t >= v_th``; then
    ``v_t <- v_reset + soft_reset (v_t - v_reset)``. The reported potential is ``v_t``
    before the reset.

    >>> gate = LIFGate(GateConfig(tau=2.0, threshold=1.0))
    >>> state = gate.initial_state(1, torch.device("cpu"))
    >>> state, v, spiked = gate.step(state, torch.tensor([0.8]))
    >>> state, v, spiked = gate.step(state, torch.tensor([0.8]))
    >>> round(v.item(), 4), bool(spiked), round(state["v"].item(), 4)
    (1.2, True, 0.72)
    """

    def __init__(self, config: GateConfig) -> None:
        self.decay = 1.0 - 1.0 / config.tau
        self.threshold = config.threshold
        self.reset = config.reset
        self.soft_reset = config.soft_reset

    def initial_state(
        self, rows: int, device: torch.device, potential: torch.Tensor | None = None
    ) -> GateState:
        v = _zeros(rows, device) + self.reset if potential is None else potential.float().clone()
        return {"v": v.to(device)}

    def potential(self, state: GateState) -> torch.Tensor:
        return state["v"]

    def step(
        self, state: GateState, divergence: torch.Tensor
    ) -> tuple[GateState, torch.Tensor, torch.Tensor]:
        v = self.decay * state["v"] + divergence
        spiked = v >= self.threshold
        after = torch.where(spiked, self.reset + self.soft_reset * (v - self.reset), v)
        return {"v": after}, v, spiked


class EMAGate:
    """Exponential moving average: ``e_t = 0.5 e_{t-1} + 0.5 D_t``; spike when ``e_t >= v_th``."""

    def __init__(self, config: GateConfig) -> None:
        self.threshold = config.threshold

    def initial_state(
        self, rows: int, device: torch.device, potential: torch.Tensor | None = None
    ) -> GateState:
        e = _zeros(rows, device) if potential is None else potential.float().clone()
        return {"e": e.to(device)}

    def potential(self, state: GateState) -> torch.Tensor:
        return state["e"]

    def step(
        self, state: GateState, divergence: torch.Tensor
    ) -> tuple[GateState, torch.Tensor, torch.Tensor]:
        e = 0.5 * state["e"] + 0.5 * divergence
        return {"e": e}, e, e >= self.threshold


class AdamGate:
    """Adam-style normalised drift of the divergence.

    ``m_t = 0.9 m + 0.1 D_t``, ``s_t = 0.999 s + 0.001 D_t^2``,
    ``u_t = m_hat / (sqrt(s_hat) + 1e-8)`` with ``m_hat = m_t / (1 - 0.9^t)`` and
    ``s_hat = s_t / (1 - 0.999^t)``, ``v_t = 0.5 v + 0.5 u_t``; spike when ``v_t >= v_th``.
    """

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, config: GateConfig) -> None:
        self.threshold = config.threshold

    def initial_state(
        self, rows: int, device: torch.device, potential: torch.Tensor | None = None
    ) -> GateState:
        v = _zeros(rows, device) if potential is None else potential.float().clone().to(device)
        zero = _zeros(rows, device)
        return {"m": zero, "s": zero.clone(), "t": zero.clone(), "v": v}

    def potential(self, state: GateState) -> torch.Tensor:
        return state["v"]

    def step(
        self, state: GateState, divergence: torch.Tensor
    ) -> tuple[GateState, torch.Tensor, torch.Tensor]:
        t = state["t"] + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * divergence
        s = self.beta2 * state["s"] + (1 - self.beta2) * divergence.square()
        m_hat = m / (1 - torch.pow(self.beta1, t))
        s_hat = s / (1 - torch.pow(self.beta2, t))
        u = m_hat / (s_hat.sqrt() + self.eps)
        v = 0.5 * state["v"] + 0.5 * u
        return {"m": m, "s": s, "t": t, "v": v}, v, v >= self.threshold


def make_gate(config: GateConfig) -> Gate:
    """The gate named by ``config.kind``."""
    return {"lif": LIFGate, "ema": EMAGate, "adam": AdamGate}[config.kind](config)
