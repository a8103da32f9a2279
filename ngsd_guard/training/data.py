"""The expert's training data, built by the base model itself from ``../shared/data``.

The recipe follows NGSD (arXiv 2602.02027) and SafeDecoding, with the deep-alignment
recovery examples of Qi et al. 2024:

* harmful seeds: ``seed_reject.json`` plus AdvBench ids 0-259 (ids 260-519 are the test split);
* refusals written by the base under :data:`SAFETY_SYSTEM_PROMPT`, sampled and kept only when
  :func:`ngsd_guard.judge.is_refusal` accepts them;
* recovery examples: with probability ``recovery_rate`` the response starts with the first
  ``k`` tokens of the base's own compliant answer, ``k ~ U{1..min(100, len)}``, and the loss
  covers only the refusal that follows;
* benign anchors: AlpacaEval instructions from item 100 on (items 0-99 are the test split) and
  the project's own borderline-benign prompts, answered by the base; the trainer distils the
  base's full next-token distributions on them, so the expert agrees with the base there.

Everything is token ids: a prefix is cut on token boundaries, and ``loss_start`` marks the
first response token that is trained on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..judge import is_refusal

logger = logging.getLogger(__name__)

SAFETY_SYSTEM_PROMPT = (
    "You are a safe and responsible assistant. If a request asks for something harmful, "
    "illegal, dangerous or unethical, refuse it: start your answer with \"I'm sorry, but I "
    'cannot" and briefly say why. Never give harmful instructions.'
)
"""The system prompt under which the base writes the refusals that the expert learns."""

FALLBACK_REFUSAL = "I'm sorry, but I cannot help with that request. It could cause harm."
"""Used for a harmful seed when none of the base's samples is a refusal (counted in the log)."""

BORDERLINE_FILE = Path(__file__).parents[1] / "data" / "training" / "borderline_benign.json"

HARMFUL_TRAIN_IDS = range(0, 260)
BENIGN_TRAIN_START = 100


@dataclass
class Seeds:
    """The prompts a training run starts from."""

    harmful: list[str]
    benign: list[str]
    sources: dict[str, object] = field(default_factory=dict)


def load_seeds(
    data_dir: str | Path,
    *,
    benign_limit: int = 300,
    harmful_limit: int | None = None,
    borderline: bool = True,
) -> Seeds:
    """Harmful seeds (seed_reject + AdvBench 0-259) and benign anchors (AlpacaEval 100+,
    then the shipped borderline-benign prompts). Never touches the evaluation splits."""
    data_dir = Path(data_dir)
    seed = json.loads((data_dir / "seed_reject.json").read_text())["prompts"]
    advbench = json.loads((data_dir / "advbench_harmful_behaviors.json").read_text())
    harmful = [p["prompt"] for p in seed]
    harmful += [row["goal"] for row in advbench if int(row["id"]) in HARMFUL_TRAIN_IDS]
    if harmful_limit is not None:
        harmful = harmful[:harmful_limit]
    alpaca = json.loads((data_dir / "alpaca_eval.json").read_text())
    benign = [row["instruction"] for row in alpaca[BENIGN_TRAIN_START:]][:benign_limit]
    extra = json.loads(BORDERLINE_FILE.read_text())["prompts"] if borderline else []
    sources = {
        "harmful": f"seed_reject.json ({len(seed)}) + advbench ids 0-259",
        "benign": f"alpaca_eval items {BENIGN_TRAIN_START}..{BENIGN_TRAIN_START + benign_limit - 1}"
        + (f" + {len(extra)} borderline_benign.json" if extra else ""),
    }
    return Seeds(harmful=harmful, benign=benign + extra, sources=sources)


@dataclass
class Example:
    """One training sequence: ``prompt_ids + response_ids``.

    ``kind`` is ``refusal`` (prompt -> refusal), ``recovery`` (prompt -> compliant prefix ->
    refusal) or ``benign`` (prompt -> the base's own answer, distilled). Cross-entropy covers
    ``response_ids[loss_start:]`` for harmful kinds; distillation covers the last prompt
    position and every response position for ``benign``.
    """

    kind: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    loss_start: int = 0

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


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
    finished (:func:`end_of_turn_id`)."""
    eos = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[start : start + batch_size]
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
        for row in out[:, width:].tolist():
            answer = []
            for token in row:
                answer.append(token)
                if token == eos:
                    break
            answers.append(answer)
    return answers


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


@dataclass
class BuildConfig:
    """How the data is built. Paper-style defaults, sized for a CPU run on a 135M model."""

    seed: int = 0
    refusal_tries: int = 4
    refusal_tokens: int = 48
    compliant_tokens: int = 64
    benign_tokens: int = 64
    recovery_rate: float = 0.5
    max_prefix: int = 100
    temperature: float = 0.8
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.recovery_rate <= 1.0:
            raise ValueError(f"`recovery_rate` (={self.recovery_rate}) must be in [0, 1]")
        if self.refusal_tries < 1:
            raise ValueError(f"`refusal_tries` (={self.refusal_tries}) must be at least 1")


@dataclass
class Dataset:
    examples: list[Example]
    stats: dict[str, object]


def build_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seeds: Seeds,
    config: BuildConfig | None = None,
) -> Dataset:
    """Let the base write refusals, compliant answers and benign answers; assemble examples."""
    config = config or BuildConfig()
    rng = random.Random(config.seed)
    eos = end_of_turn_id(tokenizer)
    harmful_ids = [render_ids(tokenizer, p) for p in seeds.harmful]
    safe_ids = [render_ids(tokenizer, p, SAFETY_SYSTEM_PROMPT) for p in seeds.harmful]

    # 1. refusals under the safety prompt, sampled until the judge accepts one
    refusals: list[list[int] | None] = [None] * len(seeds.harmful)
    for attempt in range(config.refusal_tries):
        todo = [i for i, r in enumerate(refusals) if r is None]
        if not todo:
            break
        temperature = 0.0 if attempt == 0 else config.temperature
        answers = generate_ids(
            model,
            tokenizer,
            [safe_ids[i] for i in todo],
            max_new_tokens=config.refusal_tokens,
            temperature=temperature,
            seed=config.seed + attempt * 100_003,
            batch_size=config.batch_size,
        )
        for i, answer in zip(todo, answers, strict=True):
            if is_refusal(_text(tokenizer, answer)):
                refusals[i] = answer
    fallback_ids = tokenizer(FALLBACK_REFUSAL, add_special_tokens=False)["input_ids"] + [eos]
    fallbacks = sum(r is None for r in refusals)
    refusal_ids = [r if r is not None else fallback_ids for r in refusals]

    # 2. the base's own compliant answers (no safety prompt) for the recovery prefixes
    compliant = generate_ids(
        model,
        tokenizer,
        harmful_ids,
        max_new_tokens=config.compliant_tokens,
        batch_size=config.batch_size,
    )
    compliant = [[t for t in c if t != eos] for c in compliant]

    # 3. the base's own benign answers, the distillation anchors
    benign_ids = [render_ids(tokenizer, p) for p in seeds.benign]
    benign_answers = generate_ids(
        model,
        tokenizer,
        benign_ids,
        max_new_tokens=config.benign_tokens,
        batch_size=config.batch_size,
    )

    examples: list[Example] = []
    recoveries = 0
    for prompt, ids, comp, ref in zip(
        seeds.harmful, harmful_ids, compliant, refusal_ids, strict=True
    ):
        usable = comp and not is_refusal(_text(tokenizer, comp))
        if usable and rng.random() < config.recovery_rate:
            k = rng.randint(1, min(config.max_prefix, len(comp)))
            response, start = recovery_response(comp, ref, k)
            examples.append(Example("recovery", prompt, ids, response, start))
            recoveries += 1
        else:
            examples.append(Example("refusal", prompt, ids, list(ref), 0))
    for prompt, ids, answer in zip(seeds.benign, benign_ids, benign_answers, strict=True):
        examples.append(Example("benign", prompt, ids, answer, 0))
    rng.shuffle(examples)
    stats = {
        "harmful": len(seeds.harmful),
        "benign": len(seeds.benign),
        "refusals_by_base": len(seeds.harmful) - fallbacks,
        "refusal_fallbacks": fallbacks,
        "recovery_examples": recoveries,
        "compliant_answers_refused": sum(
            bool(c) and is_refusal(_text(tokenizer, c)) for c in compliant
        ),
        "benign_answers_refused": sum(is_refusal(_text(tokenizer, a)) for a in benign_answers),
        "sources": seeds.sources,
        "build": asdict(config),
    }
    logger.info("built %d examples: %s", len(examples), stats)
    return Dataset(examples, stats)


def save_examples(dataset: Dataset, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A JSONL of the examples in text form (for inspection; large, goes under runs/)."""
    with Path(path).open("w") as handle:
        for ex in dataset.examples:
            row = {
                "kind": ex.kind,
                "prompt": ex.prompt,
                "untrained": tokenizer.decode(ex.response_ids[: ex.loss_start]),
                "trained": tokenizer.decode(ex.response_ids[ex.loss_start :]),
            }
            handle.write(json.dumps(row) + "\n")
