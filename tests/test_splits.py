"""The train/evaluation boundaries of ngsd_guard.splits are disjoint, for requests and for the
held-out context families."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ngsd_guard import sources, splits
from ngsd_guard.contexts import dialogue, jailbreaks, rag
from ngsd_guard.evaluation.sets import NAMED_SETS, load_set
from ngsd_guard.training.data import load_seeds

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


@needs_data
def test_training_requests_never_meet_evaluation_requests():
    seeds = load_seeds(SHARED, benign_limit=10_000)
    trained = {_norm(r.text) for r in [*seeds.harmful, *seeds.benign]}
    for name in NAMED_SETS:
        for eval_set in load_set(name, SHARED):
            overlap = trained & {_norm(p) for p in eval_set.prompts}
            assert not overlap, (name, sorted(overlap)[:3])


@needs_data
def test_fixed_splits_of_the_shared_sets():
    advbench = sources.advbench(SHARED, "train")
    assert len(advbench) == 260 and len(sources.advbench(SHARED, "eval")) == 260
    assert len(sources.alpaca(SHARED, "eval")) == 100
    dna_train, dna_eval = sources.donotanswer(SHARED, "train"), sources.donotanswer(SHARED, "eval")
    assert 600 < len(dna_train) + len(dna_eval) <= 243 + 248 + 176
    assert not {r.text for r in dna_train} & {r.text for r in dna_eval}


def test_project_requests_split_and_cover_the_categories():
    for label in ("harmful", "benign"):
        train, held_out = sources.project(label, "train"), sources.project(label, "eval")
        assert train and held_out and not {r.text for r in train} & {r.text for r in held_out}
    categories = {r.category for r in sources.project("harmful", "eval")}
    assert {"self_harm", "hate_harassment", "stalking_privacy", "extremism"} <= categories
    assert {"weapons", "drugs", "cyber", "fraud"} <= categories


def test_rag_templates_held_out_for_rag_unseen():
    custom, unseen = set(splits.RAG_CUSTOM_TEMPLATES), set(splits.RAG_UNSEEN_TEMPLATES)
    assert custom and unseen and not custom & unseen
    assert custom | unseen == set(rag.TEMPLATES)
    texts = {
        name: {t for t in rag.TEMPLATES[name] if t and t != "{request}"} for name in rag.TEMPLATES
    }
    assert not set().union(*(texts[n] for n in custom)) & set().union(*(texts[n] for n in unseen))


def test_jailbreak_families_and_templates_held_out():
    assert not set(splits.JAILBREAK_TRAIN_FAMILIES) & set(splits.JAILBREAK_UNSEEN_FAMILIES)
    for family in splits.JAILBREAK_UNSEEN_FAMILIES:
        assert jailbreaks.templates(family, "train") == ()
        assert jailbreaks.templates(family, "eval")
    for family in splits.JAILBREAK_TRAIN_FAMILIES:
        train, held_out = (
            jailbreaks.templates(family, "train"),
            jailbreaks.templates(family, "eval"),
        )
        assert train and held_out and not set(train) & set(held_out)
    assert set(jailbreaks.FAMILIES) == set(splits.JAILBREAK_TRAIN_FAMILIES) | set(
        splits.JAILBREAK_UNSEEN_FAMILIES
    )


def test_conversation_and_agent_pools_held_out():
    train = {json.dumps(c) for c in dialogue.conversations("train")}
    assert train and not train & {json.dumps(c) for c in dialogue.conversations("eval")}
    train = {a["system"] for a in dialogue.agents("train")}
    assert train and not train & {a["system"] for a in dialogue.agents("eval")}
