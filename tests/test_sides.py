"""A model side's cache: dropped, compacted, merged or reordered, it gives the same logits."""

from __future__ import annotations

import torch

from ngsd_guard.experts import ModelHandle, Runner
from ngsd_guard.sides import prefill


def _runner(model) -> Runner:
    return Runner(ModelHandle(model), model.config.vocab_size, torch.device("cpu"))


def _full(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_forgotten_and_compacted_slots_do_not_change_the_logits(tiny_base, monkeypatch):
    monkeypatch.setattr("ngsd_guard.sides.COMPACT_MIN_SLOTS", 2)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    done = prefill(_runner(tiny_base), prompts, pad_id=2)
    side = done.side
    assert torch.allclose(done.logits[0], _full(tiny_base, prompts[0]), atol=1e-4)
    # row 0 feeds 3 tokens, row 1 one (the rest of its chunk is dead), then row 0 drops 2
    side.feed(torch.tensor([[20, 21, 22], [30, 2, 2]]), torch.tensor([3, 1]))
    side.forget(0, 2)
    width = side.mask.shape[1]
    side.reclaim()
    assert side.mask.shape[1] < width  # the dead tail was cropped or compacted
    logits = side.feed(torch.tensor([[40], [41]]))[:, -1]
    assert torch.allclose(logits[0], _full(tiny_base, [*prompts[0], 20, 40]), atol=1e-4)
    assert torch.allclose(logits[1], _full(tiny_base, [*prompts[1], 30, 41]), atol=1e-4)


def test_rows_leave_and_join(tiny_base):
    runner = _runner(tiny_base)
    side = prefill(runner, [[5, 6, 7], [8, 9]], pad_id=2).side
    side.feed(torch.tensor([[20], [21]]))
    side.select(torch.tensor([1]))
    other = prefill(runner, [[12, 13, 14, 15, 16, 17]], pad_id=2).side
    side.extend(other)
    logits = side.feed(torch.tensor([[30], [31]]))[:, -1]
    assert torch.allclose(logits[0], _full(tiny_base, [8, 9, 21, 30]), atol=1e-4)
    assert torch.allclose(logits[1], _full(tiny_base, [12, 13, 14, 15, 16, 17, 31]), atol=1e-4)


def test_a_prefill_over_headers_gives_the_logits_and_features_of_whole_prompts(tiny_base):
    from ngsd_guard.features import PromptFeatures
    from ngsd_guard.prefixes import compute_header

    runner = _runner(tiny_base)
    features = PromptFeatures.parse("last@1+mean@1")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17]]
    spans = [(4, 6), (2, 3), (0, 3)]
    headers = [compute_header(runner, [5, 6, 7, 8]), compute_header(runner, [11, 12]), None]
    whole = prefill(runner, prompts, pad_id=2, features=features, spans=spans)
    split = prefill(runner, prompts, pad_id=2, headers=headers, features=features, spans=spans)
    assert split.side.mask.shape[1] == 4 + 3  # the widest header, then the longest rest
    assert torch.allclose(split.logits, whole.logits, atol=1e-4)
    assert torch.allclose(split.features, whole.features, atol=1e-4)
    logits = split.side.feed(torch.tensor([[40], [41], [42]]))[:, -1]
    for row, (prompt, token) in enumerate(zip(prompts, (40, 41, 42), strict=True)):
        assert torch.allclose(logits[row], _full(tiny_base, [*prompt, token]), atol=1e-4)
