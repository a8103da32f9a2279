import math

import torch

from ngsd_guard.divergence import DIVERGENCES, cosine, jsd, kl, total_variation

P = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0], [0.1] * 10])
Q = torch.tensor([[0.5, 0, 0.5, 0, 0, 0, 0, 0, 0, 0], [0.1] * 10])


def test_total_variation_closed_form():
    assert torch.allclose(total_variation(P, Q), torch.tensor([0.5, 0.0]))


def test_kl_closed_form():
    p = torch.tensor([[0.5, 0.5] + [0.0] * 8])
    q = torch.tensor([[0.25, 0.75] + [0.0] * 8])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert torch.allclose(kl(p, q), torch.tensor([expected]), atol=1e-6)
    assert kl(P, P).abs().max() < 1e-6


def test_jsd_disjoint_is_ln2():
    p = torch.tensor([[1.0, 0.0] + [0.0] * 8])
    q = torch.tensor([[0.0, 1.0] + [0.0] * 8])
    assert torch.allclose(jsd(p, q), torch.tensor([math.log(2)]), atol=1e-5)


def test_cosine_closed_form():
    # <p, q> = 0.25, |p| = |q| = sqrt(0.5): cos = 0.5
    assert torch.allclose(cosine(P, Q), torch.tensor([0.5, 0.0]), atol=1e-6)


def test_all_divergences_are_batched_and_fp32():
    for fn in DIVERGENCES.values():
        out = fn(P, Q)
        assert out.shape == (2,) and out.dtype == torch.float32
