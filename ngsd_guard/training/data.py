"""The expert's training data, built by the base model itself, in the contexts where the guard
is used.

The recipe follows NGSD (arXiv 2602.02027) and SafeDecoding, with the deep-alignment recovery
examples of Qi et al. 2024, and places every request where users put it
(:mod:`ngsd_guard.contexts`: RAG templates, conversations, agent prompts, jailbreaks):

* requests (:func:`load_seeds`, training side of :mod:`ngsd_guard.splits`): harmful ones from
  ``seed_reject.json``, AdvBench ids 0-259, Do-Not-Answer's harm categories and the project's
  own list (self-harm, hate, stalking, extremism, weapons, drugs, cyber, fraud, ...); benign
  ones from AlpacaEval items 100+, and the project's look-alikes (figurative language,
  homonyms, safety, medical, history, fiction);
* a plan (:func:`plan_requests`): each request in ``harmful_contexts`` / ``benign_contexts``
  contexts drawn from :data:`ngsd_guard.contexts.TRAIN_CONTEXTS`;
* refusals written by the base under :data:`SAFETY_SYSTEM_PROMPT` for the bare request, sampled
  and kept only when the keyword judge accepts them and they end their turn; otherwise one of
  the project's written refusals (``data/training/responses.json``). Self-harm requests get a
  short supportive reply that points to help instead of a bare refusal;
* recovery examples: with probability ``recovery_rate`` the response starts with the first
  ``k`` tokens of the base's own compliant answer *in that context*, ``k ~ U{1..min(100, len)}``,
  and the loss covers only the refusal that follows;
* benign anchors: the base's own answer in that context; the trainer distils the base's full
  next-token distributions on them, so the expert agrees with the base there.

Everything is token ids: a prefix is cut on token boundaries, and ``loss_start`` marks the
first response token that is trained on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .. import sources
from ..contexts import TRAIN_CONTEXTS, Conversation, wrap
from ..errors import ConfigError
from ..judge import is_refusal
from ..sources import Request

logger = logging.getLogger(__name__)

SAFETY_SYSTEM_PROMPT = (
    "You are a safe and responsible assistant. If a request asks for something harmful, "
    "illegal, dangerous or unethical, refuse it: start your answer with \"I'm sorry, but I "
    'cannot" and briefly say why. Never give harmful instructions.'
)
"""The system prompt under which the base writes the refusals that the expert learns."""

TRAINING_DATA = Path(__file__).parents[1] / "data" / "training"
BORDERLINE_FILE = TRAINING_DATA / "borderline_benign.json"
RESPONSES_FILE = TRAINING_DATA / "responses.json"

_DOCUMENT_CONTEXTS = ("rag-llamaindex", "rag-langchain", "rag-custom", "agent-tools")


@dataclass
class Seeds:
    """The requests a training run starts from."""

    harmful: list[Request]
    benign: list[Request]
    sources: dict[str, object] = field(default_factory=dict)


def load_seeds(
    data_dir: str | Path,
    *,
    benign_limit: int = 400,
    harmful_limit: int | None = None,
    borderline: bool = True,
) -> Seeds:
    """Harmful and benign requests, training side only (:mod:`ngsd_guard.splits`)."""
    data_dir = Path(data_dir)
    harmful = [
        *sources.seed_reject(data_dir),
        *sources.advbench(data_dir, "train"),
        *sources.donotanswer(data_dir, "train"),
        *sources.project("harmful", "train"),
    ]
    if harmful_limit is not None:
        harmful = harmful[:harmful_limit]
    benign = sources.alpaca(data_dir, "train")[:benign_limit]
    extra = json.loads(BORDERLINE_FILE.read_text())["prompts"] if borderline else []
    benign += [Request(text, source="borderline") for text in extra]
    benign += sources.project("benign", "train")
    counts: dict[str, int] = {}
    for request in [*harmful, *benign]:
        counts[request.source] = counts.get(request.source, 0) + 1
    return Seeds(harmful=harmful, benign=benign, sources=counts)


@dataclass(frozen=True)
class PlannedRequest:
    """One training request in one context."""

    label: str
    category: str
    source: str
    conversation: Conversation

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "category": self.category,
            "source": self.source,
            **self.conversation.to_json(),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> PlannedRequest:
        return cls(
            record["label"],
            record.get("category", ""),
            record.get("source", ""),
            Conversation.from_json(record),
        )


def plan_requests(seeds: Seeds, config: BuildConfig) -> list[PlannedRequest]:
    """Each harmful request in ``config.harmful_contexts`` contexts (those of a category in
    ``config.category_contexts``: in that many) and each benign one in
    ``config.benign_contexts``, drawn from :data:`~ngsd_guard.contexts.TRAIN_CONTEXTS`
    (deterministic under ``config.seed``)."""
    rng = random.Random(config.seed)
    names, weights = zip(*TRAIN_CONTEXTS.items(), strict=True)
    plan = []
    for label, requests, count in (
        ("harmful", seeds.harmful, config.harmful_contexts),
        ("benign", seeds.benign, config.benign_contexts),
    ):
        for request in requests:
            if label == "harmful":
                count = config.category_contexts.get(request.category, config.harmful_contexts)
            for context in rng.choices(names, weights, k=count):
                conversation = wrap(request.text, context, "train", rng)
                plan.append(PlannedRequest(label, request.category, request.source, conversation))
    return plan


def save_plan(plan: Sequence[PlannedRequest], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(p.to_json()) + "\n" for p in plan))


def load_plan(path: str | Path) -> list[PlannedRequest]:
    lines = Path(path).read_text().splitlines()
    return [PlannedRequest.from_json(json.loads(line)) for line in lines if line.strip()]


@dataclass
class Example:
    """One training sequence: ``prompt_ids + response_ids``.

    ``kind`` is ``refusal`` (prompt -> refusal), ``recovery`` (prompt -> compliant prefix ->
    refusal) or ``benign`` (prompt -> the base's own answer, distilled). Cross-entropy covers
    ``response_ids[loss_start:]`` for harmful kinds; distillation covers the last prompt
    position and every response position for ``benign``. ``category``: the request's harm
    category (``sources.SELF_HARM``, ...; empty for benign requests).
    """

    kind: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    loss_start: int = 0
    context: str = "bare"
    category: str = ""

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


Render = Callable[[Conversation], list[int]]
"""A conversation -> the token ids the engine feeds the base (chat template, tools)."""


def render_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None
) -> list[int]:
    """The chat-template ids the engine feeds the base for one user message."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template closes an assistant turn with (``<|im_end|>`` for ChatML).

    Read from the template itself rather than ``tokenizer.eos_token_id``, which some
    conversions (GGUF) set to another special token.
    """
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer("y", add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(answer), -1, -1):
        if ids[start : start + len(answer)] == answer and start + len(answer) < len(ids):
            return ids[start + len(answer)]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template turn end nor an EOS token")
    return tokenizer.eos_token_id


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Batched left-padded generation; each answer ends with the end-of-turn token when it
    finished (:func:`end_of_turn_id`). Prompts are batched in order of length, so that a
    batch is little padding; the answers come back in the prompts' order."""
    eos = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    answers: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        chunk = [prompts_ids[i] for i in indices]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in chunk], device=device)
        torch.manual_seed(seed + start)
        sample = temperature > 0
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=0.95 if sample else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos,
        )  # (B, width + new)
        for index, row in zip(indices, out[:, width:].tolist(), strict=True):
            answer = []
            for token in row:
                answer.append(token)
                if token == eos:
                    break
            answers[index] = answer
    return [answers[i] for i in range(len(prompts_ids))]


def _text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def recovery_response(
    compliant_ids: Sequence[int], refusal_ids: Sequence[int], k: int
) -> tuple[list[int], int]:
    """``compliant_ids[:k] + refusal_ids`` and the index where the trained refusal starts."""
    if not 1 <= k <= len(compliant_ids):
        raise ValueError(f"`k` (={k}) must be in 1..{len(compliant_ids)} (the compliant length)")
    prefix = list(compliant_ids[:k])
    return prefix + list(refusal_ids), len(prefix)


CATEGORY_CONTEXTS = {"self_harm": 4}
"""Harmful categories planned in more contexts than ``harmful_contexts`` by default. A
self-harm request is answered with a supportive reply that points to help, not a refusal;
at two contexts each (144 of 5068 examples) one epoch of a fresh adapter learned none of it
(0 of 6 checks), where a corrective stage with three per request learned 5 of 6."""


def parse_category_counts(pairs: Sequence[str]) -> dict[str, int]:
    """``["self_harm=4", "weapons=3"]`` -> ``{"self_harm": 4, "weapons": 3}``; a pair that is
    not ``CATEGORY=K`` with K >= 1 is a ConfigError."""
    out = {}
    for pair in (part.strip() for part in pairs):
        category, _, count = pair.partition("=")
        if not category or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"expected CATEGORY=K with K >= 1, got {pair!r}")
        out[category] = int(count)
    return out


@dataclass
class BuildConfig:
    """How the data is built. Paper-style defaults; every request in its drawn contexts."""

    seed: int = 0
    refusal_tries: int = 4
    refusal_tokens: int = 64
    compliant_tokens: int = 64
    benign_tokens: int = 64
    recovery_rate: float = 0.5
    max_prefix: int = 100
    temperature: float = 0.8
    batch_size: int = 32
    harmful_contexts: int = 2
    benign_contexts: int = 2
    category_contexts: dict[str, int] = field(default_factory=lambda: dict(CATEGORY_CONTEXTS))

    def __post_init__(self) -> None:
        if not 0.0 <= self.recovery_rate <= 1.0:
            raise ConfigError(f"`recovery_rate` (={self.recovery_rate}) must be in [0, 1]")
        if self.refusal_tries < 1:
            raise ConfigError(f"`refusal_tries` (={self.refusal_tries}) must be at least 1")
        if self.harmful_contexts < 1 or self.benign_contexts < 1:
            raise ConfigError("`harmful_contexts` and `benign_contexts` must be at least 1")
        for category, count in self.category_contexts.items():
            if count < 1:
                raise ConfigError(f"`category_contexts` of {category!r} (={count}) must be >= 1")


@dataclass
class Dataset:
    examples: list[Example]
    stats: dict[str, object]


@dataclass(frozen=True)
class WrittenResponses:
    """The project's written responses (``data/training/responses.json``): generic refusals,
    refusals that name a category's harm (only ever chosen for that category), supportive
    replies for self-harm, and refusals that stay within a document context."""

    refusals: tuple[str, ...]
    self_harm: tuple[str, ...]
    in_context: tuple[str, ...]
    topical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = RESPONSES_FILE) -> WrittenResponses:
        rows = json.loads(path.read_text())
        topical = {k: tuple(v) for k, v in rows.get("topical_refusals", {}).items()}
        return cls(
            tuple(rows["refusals"]), tuple(rows["self_harm"]), tuple(rows["in_context"]), topical
        )

    def choose(self, planned: PlannedRequest, rng: random.Random) -> str:
        """A supportive reply for self-harm, else a refusal suited to the context: in a
        document context one that stays with the documents, else a generic one or one that
        names the request's own category."""
        if planned.category == sources.SELF_HARM:
            return rng.choice(self.self_harm)
        if planned.conversation.context in _DOCUMENT_CONTEXTS:
            return rng.choice(self.in_context)
        return rng.choice(self.refusals + self.topical.get(planned.category, ()))


def base_refusals(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[str],
    config: BuildConfig,
) -> list[list[int] | None]:
    """The base's own refusal of each bare request under :data:`SAFETY_SYSTEM_PROMPT`: greedy,
    then sampled, kept when the judge accepts it and it ends its turn; None when none did."""
    eos = end_of_turn_id(tokenizer)
    safe_ids = [render_ids(tokenizer, r, SAFETY_SYSTEM_PROMPT) for r in requests]
    refusals: list[list[int] | None] = [None] * len(requests)
    for attempt in range(config.refusal_tries):
        todo = [i for i, r in enumerate(refusals) if r is None]
        if not todo:
            break
        answers = generate_ids(
            model,
            tokenizer,
            [safe_ids[i] for i in todo],
            max_new_tokens=config.refusal_tokens,
            temperature=0.0 if attempt == 0 else config.temperature,
            seed=config.seed + attempt * 100_003,
            batch_size=config.batch_size,
        )
        for i, answer in zip(todo, answers, strict=True):
            if answer and answer[-1] == eos and is_refusal(_text(tokenizer, answer)):
                refusals[i] = answer
    return refusals


def build_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Sequence[PlannedRequest],
    render: Render,
    config: BuildConfig | None = None,
    responses: WrittenResponses | None = None,
) -> Dataset:
    """Let the base write refusals, compliant answers and benign answers for the planned
    requests; assemble the examples (shuffled, deterministic under ``config.seed``)."""
    config = config or BuildConfig()
    responses = responses or WrittenResponses.load()
    rng = random.Random(config.seed)
    eos = end_of_turn_id(tokenizer)
    harmful = [p for p in plan if p.label == "harmful"]
    benign = [p for p in plan if p.label == "benign"]

    # 1. the base's refusals of the bare requests (self-harm gets a supportive reply instead)
    bare = sorted({p.conversation.request for p in harmful if p.category != sources.SELF_HARM})
    by_request = dict(zip(bare, base_refusals(model, tokenizer, bare, config), strict=True))

    # 2. the base's own answers in context: compliant ones (recovery prefixes), benign anchors
    harmful_ids = [render(p.conversation) for p in harmful]
    compliant = generate_ids(
        model,
        tokenizer,
        harmful_ids,
        max_new_tokens=config.compliant_tokens,
        batch_size=config.batch_size,
    )
    compliant = [[t for t in c if t != eos] for c in compliant]
    benign_ids = [render(p.conversation) for p in benign]
    benign_answers = generate_ids(
        model,
        tokenizer,
        benign_ids,
        max_new_tokens=config.benign_tokens,
        batch_size=config.batch_size,
    )

    examples: list[Example] = []
    written = recoveries = 0
    for planned, ids, comp in zip(harmful, harmful_ids, compliant, strict=True):
        refusal = by_request.get(planned.conversation.request)
        if refusal is None:
            text = responses.choose(planned, rng)
            refusal = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            written += 1
        request, context = planned.conversation.request, planned.conversation.context
        usable = comp and not is_refusal(_text(tokenizer, comp))
        if usable and rng.random() < config.recovery_rate:
            k = rng.randint(1, min(config.max_prefix, len(comp)))
            response, start = recovery_response(comp, refusal, k)
            examples.append(
                Example("recovery", request, ids, response, start, context, planned.category)
            )
            recoveries += 1
        else:
            examples.append(
                Example("refusal", request, ids, list(refusal), 0, context, planned.category)
            )
    for planned, ids, answer in zip(benign, benign_ids, benign_answers, strict=True):
        examples.append(
            Example(
                "benign", planned.conversation.request, ids, answer, 0, planned.conversation.context
            )
        )
    rng.shuffle(examples)
    contexts: dict[str, int] = {}
    for ex in examples:
        contexts[ex.context] = contexts.get(ex.context, 0) + 1
    stats = {
        "harmful": len(harmful),
        "benign": len(benign),
        "refusals_by_base": sum(r is not None for r in by_request.values()),
        "base_refusal_tries": len(by_request),
        "written_responses": written,
        "recovery_examples": recoveries,
        "compliant_answers_refused": sum(
            bool(c) and is_refusal(_text(tokenizer, c)) for c in compliant
        ),
        "benign_answers_refused": sum(is_refusal(_text(tokenizer, a)) for a in benign_answers),
        "contexts": contexts,
        "build": asdict(config),
    }
    logger.info("built %d examples: %s", len(examples), stats)
    return Dataset(examples, stats)


def save_examples(dataset: Dataset, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A JSONL of the examples in text form, one per line: ``kind``, ``context``,
    ``category``, ``request``, ``prompt`` (the rendered prompt), ``untrained`` (a recovery's
    compliant prefix) and ``trained`` (what the loss covers). :func:`load_examples` reads it
    back."""
    with Path(path).open("w") as handle:
        for ex in dataset.examples:
            row = {
                "kind": ex.kind,
                "context": ex.context,
                "category": ex.category,
                "request": ex.prompt,
                "prompt": tokenizer.decode(ex.prompt_ids),
                "untrained": tokenizer.decode(ex.response_ids[: ex.loss_start]),
                "trained": tokenizer.decode(ex.response_ids[ex.loss_start :]),
            }
            handle.write(json.dumps(row) + "\n")


def load_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """The examples of a :func:`save_examples` file, tokenised again (special tokens as
    written), so that a LoRA can be trained without building the data anew."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "request" not in row:
            raise ConfigError(f"{path}:{number}: an example needs its `request`")
        untrained = ids(row["untrained"])
        examples.append(
            Example(
                row["kind"],
                row["request"],
                ids(row["prompt"]),
                untrained + ids(row["trained"]),
                len(untrained),
                row.get("context", "bare"),
                row.get("category", ""),
            )
        )
    return examples
