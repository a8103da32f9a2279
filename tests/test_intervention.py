import torch

from ngsd_guard.intervention import intervene


def test_mix_on_union_and_zero_elsewhere():
    p_base = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    p_expert = torch.tensor([[0.0, 0.1, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]])
    scores = intervene(p_base, p_expert, torch.tensor([0.5, 1.0]), top_k=1)
    # row 0: C = {0 (base top), 3 (expert top)}: s = [0.3, -, -, 0.35] renormalised
    assert torch.allclose(scores[0], torch.tensor([0.3, 0, 0, 0.35]) / 0.65)
    # row 1: ties -> C = {index chosen by topk}; mass stays a distribution
    assert torch.isclose(scores[1].sum(), torch.tensor(1.0))


def test_alpha_one_is_expert_argmax_alpha_zero_is_base_argmax():
    torch.manual_seed(0)
    p_base = torch.softmax(torch.randn(3, 50) * 3, -1)
    p_expert = torch.softmax(torch.randn(3, 50) * 3, -1)
    ones = intervene(p_base, p_expert, torch.ones(3), top_k=5)
    zeros = intervene(p_base, p_expert, torch.zeros(3), top_k=5)
    assert torch.equal(ones.argmax(-1), p_expert.argmax(-1))
    assert torch.equal(zeros.argmax(-1), p_base.argmax(-1))
