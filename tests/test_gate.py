import math

import pytest
import torch

from ngsd_guard import ConfigError, GateConfig
from ngsd_guard.gate import AdamGate, EMAGate, LIFGate, make_gate

CPU = torch.device("cpu")


def run(gate, divergences):
    state = gate.initial_state(2, CPU)
    out = []
    for d in divergences:
        state, v, spiked = gate.step(state, torch.tensor(d))
        out.append((v.tolist(), spiked.tolist(), next(iter(state.values())).tolist()))
    return out


def test_lif_hand_computed_batch_of_two():
    gate = LIFGate(GateConfig(tau=8, threshold=1.0, reset=0.0, soft_reset=0.6))
    steps = run(gate, [[0.6, 0.1], [0.5, 0.1], [0.0, 0.1]])
    # row 0: v1 = 0.6; v2 = 0.875*0.6 + 0.5 = 1.025 -> spike, reset to 0.615; v3 = 0.538125
    assert steps[0][0] == pytest.approx([0.6, 0.1])
    assert steps[1][0] == pytest.approx([1.025, 0.1875])
    assert steps[1][1] == [True, False]
    assert steps[1][2] == pytest.approx([0.615, 0.1875])
    assert steps[2][0] == pytest.approx([0.538125, 0.1 + 0.875 * 0.1875])
    assert steps[2][1] == [False, False]


def test_lif_soft_reset_towards_reset_potential():
    gate = LIFGate(GateConfig(tau=2, threshold=0.5, reset=0.2, soft_reset=0.5))
    ((v, spiked, after),) = run(gate, [[0.4, 1.0]])
    # v starts at reset 0.2: v = 0.5*0.2 + D
    assert v == pytest.approx([0.5, 1.1])
    assert spiked == [True, True]
    assert after == pytest.approx([0.2 + 0.5 * 0.3, 0.2 + 0.5 * 0.9])


def test_ema_closed_form():
    gate = EMAGate(GateConfig(kind="ema", threshold=0.3))
    steps = run(gate, [[0.4, 0.2], [0.4, 0.2]])
    assert steps[0][0] == pytest.approx([0.2, 0.1])
    assert steps[1][0] == pytest.approx([0.3, 0.15])
    assert steps[1][1] == [True, False]


def test_adam_closed_form():
    gate = AdamGate(GateConfig(kind="adam", threshold=0.9))
    steps = run(gate, [[0.5, 0.0], [0.5, 0.0]])
    # constant D: m_hat = D, s_hat = D^2, u = D / (D + 1e-8) ~ 1 -> v = 0.5, then 0.75
    assert steps[0][0][0] == pytest.approx(0.5, abs=1e-5)
    assert steps[1][0][0] == pytest.approx(0.75, abs=1e-5)
    assert steps[1][0][1] == 0.0
    # step 2 by hand with D = 0.5 then 1.0
    state = gate.initial_state(1, CPU)
    state, _, _ = gate.step(state, torch.tensor([0.5]))
    state, v, _ = gate.step(state, torch.tensor([1.0]))
    m = 0.9 * 0.05 + 0.1 * 1.0
    s = 0.999 * 0.00025 + 0.001 * 1.0
    u = (m / (1 - 0.9**2)) / (math.sqrt(s / (1 - 0.999**2)) + 1e-8)
    assert v.item() == pytest.approx(0.5 * 0.5 + 0.5 * u, rel=1e-4)


def test_primed_potential_and_factory():
    gate = make_gate(GateConfig())
    state = gate.initial_state(2, CPU, potential=torch.tensor([0.9, 0.0]))
    _, v, spiked = gate.step(state, torch.tensor([0.3, 0.3]))
    assert spiked.tolist() == [True, False]
    assert v.tolist() == pytest.approx([0.875 * 0.9 + 0.3, 0.3])


@pytest.mark.parametrize(
    "bad", [{"tau": 0}, {"tau": -1}, {"soft_reset": 1.5}, {"kind": "relu"}, {"threshold": -1}]
)
def test_invalid_gate_values_name_the_field(bad):
    with pytest.raises(ConfigError) as error:
        GateConfig(**bad)
    assert next(iter(bad)) in str(error.value)
