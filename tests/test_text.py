"""Streaming detokenisation with stop strings, and the early-stopping rule (real tokenizer)."""

from __future__ import annotations

from ngsd_guard.detokenize import RowText
from ngsd_guard.stopping import RefusalStop

TEXT = "Héllo wörld 你好啊集团 こんにちは!  Spaces\n\nnew  line 🙂 end."


def test_deltas_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    ids.insert(5, tokenizer.eos_token_id)  # a special token adds no text
    text = RowText(tokenizer, stop=())
    deltas = [text.add(t, final=i == len(ids) - 1).delta for i, t in enumerate(ids)]
    assert "".join(deltas) == text.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(deltas)  # partial characters are held, never emitted


def test_stop_string_across_tokens_is_held_then_cut(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text = RowText(tokenizer, stop=["\n\nnew", "zzz"])
    steps = []
    for token in ids:
        steps.append(text.add(token, final=False))
        if steps[-1].stopped:
            break
    assert steps[-1].stopped and not any(s.stopped for s in steps[:-1])
    assert text.text == TEXT[: TEXT.index("\n\nnew")]
    assert "".join(s.delta for s in steps) == text.text


def test_held_prefix_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("Say ab", add_special_tokens=False)
    text = RowText(tokenizer, stop=["abc"])
    deltas = [text.add(t, final=i == len(ids) - 1).delta for i, t in enumerate(ids)]
    assert "".join(deltas) == "Say ab" and not any(d.endswith("ab") for d in deltas[:-1])


def test_refusal_stop_ends_at_the_next_sentence_end():
    rule = RefusalStop(after=3)
    assert rule.end("I'm ", 1) is None and rule.end("sor", 2) is None
    assert rule.end("ry", 3) is None  # marker split over deltas: established now
    assert rule.end(", but I can", 4) is None
    assert rule.end("not. More", 5) == 4  # keep "not."
    early = RefusalStop(after=10)
    assert early.end("I cannot. ", 2) is None  # a marker before `after` tokens waits
    assert early.end("Well", 10) is None and early.end(" no!", 11) == 4
