"""The one place that says what trains and what evaluates.

Training (``ngsd_guard.training``) and evaluation (``ngsd_guard.evaluation``) both import these
boundaries; ``tests/test_splits.py`` checks that they are disjoint, for requests and for the
context families (RAG templates, conversations, agents, jailbreak families) held out for
evaluation.

* ``seed_reject.json``: trains (all 36);
* AdvBench: ids 0-259 train, ids 260-519 evaluate (``advbench-test``);
* Do-Not-Answer, harm categories: index ``i % 5 == 4`` of each file evaluates
  (``donotanswer-test``), the rest trains;
* AlpacaEval: items 100-804 train, items 0-99 evaluate (``alpaca``);
* XSTest: evaluates only (``xstest-safe``, ``xstest-unsafe``);
* the project's requests (``data/training``), conversations and agents (``data/contexts``) and
  the templates of each training jailbreak family: index ``i % 4 == 3`` evaluates
  (``project-harmful``, ``project-benign``), the rest trains;
* RAG templates: the frameworks' defaults on both sides; the project's custom ones train,
  the unseen ones evaluate; text ReAct prompts: LlamaIndex's on both sides, LangChain's
  evaluates only; jailbreak families: the unseen ones evaluate only.
"""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "eval"]

ADVBENCH_TRAIN_IDS = range(0, 260)
ADVBENCH_TEST_IDS = range(260, 520)
ALPACA_TEST_ITEMS = range(0, 100)
ALPACA_TRAIN_START = 100

DONOTANSWER_HARM_FILES = (
    "malicious_uses.jsonl",
    "information_hazard.jsonl",
    "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
)
"""Do-Not-Answer's harm categories (``human_chatbox`` and ``misinformation_harms`` are not harm,
so never refusal targets)."""


def donotanswer_split(index: int) -> Split:
    """Every fifth request of each Do-Not-Answer harm file is held out for evaluation."""
    return "eval" if index % 5 == 4 else "train"


def project_split(index: int) -> Split:
    """Every fourth item of the project's own lists (requests, conversations, agents)."""
    return "eval" if index % 4 == 3 else "train"


RAG_CUSTOM_TEMPLATES = ("company-docs", "context-question", "search-results", "text-above")
"""The project's own RAG templates that training uses (``rag-custom``); the frameworks' default
templates (``rag-llamaindex``, ``rag-langchain``) are used by both sides, as users meet them."""

RAG_UNSEEN_TEMPLATES = ("given-information", "xml-documents", "markdown-sources", "support-bot")
"""RAG templates that training never uses (``rag-unseen``)."""

REACT_UNSEEN_TEMPLATES = ("langchain-react",)
"""Text ReAct prompts that training never uses (``agent-react``); LlamaIndex's default trains."""

JAILBREAK_TRAIN_FAMILIES = (
    "roleplay",
    "fiction",
    "hypothetical",
    "ignore-instructions",
    "past-tense",
)
"""Jailbreak families training uses; every fourth template of each is held out for evaluation."""

JAILBREAK_UNSEEN_FAMILIES = (
    "refusal-suppression",
    "prefix-injection",
    "research-pretext",
    "developer-mode",
)
"""Jailbreak families that training never uses; the ``jailbreak`` context draws from both."""
