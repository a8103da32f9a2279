import torch

from ngsd_guard import DecodingConfig
from ngsd_guard.sampling import SamplingParams, choose, filter_distribution, sample, uniforms


def _params(**fields) -> SamplingParams:
    return SamplingParams.of([DecodingConfig(**fields)])


def test_inverse_cdf_sampling():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]])
    # sorted: 0.6 (id 1), 0.3 (id 2), 0.1 (id 0)
    assert sample(probs, torch.tensor([0.5, 0.95])).tolist() == [1, 0]
    assert sample(probs, torch.tensor([0.7, 0.0])).tolist() == [2, 1]


def test_filters():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    top_k = filter_distribution(probs, _params(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.tensor([[0.625, 0.375, 0, 0]]))
    top_p = filter_distribution(probs, _params(temperature=1.0, top_p=0.8))
    assert torch.allclose(top_p, torch.tensor([[0.625, 0.375, 0, 0]]))
    hot = filter_distribution(probs, _params(temperature=0.5))
    expected = probs**2 / (probs**2).sum()
    assert torch.allclose(hot, expected)


def test_greedy_and_seeded_uniforms():
    probs = torch.tensor([[0.2, 0.8]])
    assert choose(probs, torch.tensor([0.99]), _params()).tolist() == [1]
    assert torch.equal(uniforms(2, 5, seed=3), uniforms(2, 5, seed=3))
    assert not torch.equal(uniforms(2, 5, seed=3), uniforms(2, 5, seed=4))


def test_each_row_keeps_its_own_settings():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    params = SamplingParams.of(
        [
            DecodingConfig(),  # greedy
            DecodingConfig(temperature=1.0, top_k=2),
            DecodingConfig(temperature=1.0, top_p=0.8),
        ]
    )
    filtered = filter_distribution(probs, params)
    assert torch.allclose(filtered[0], probs[0])  # temperature 0 is left to argmax
    assert torch.allclose(filtered[1:], torch.tensor([[0.625, 0.375, 0, 0]] * 2))
    u = torch.tensor([0.99, 0.99, 0.99])
    assert choose(probs, u, params).tolist() == [0, 1, 1]
