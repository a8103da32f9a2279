"""The real SmolLM2 tokenizer dressed as other model families, for tool-format tests.

Each family gets a chat template written for the tests (``tests/data/chat_templates``) and its
special tokens, which take the ids of SmolLM2's unused special tokens (3-16), so the default
model's logits cover them. Built in a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ngsd_guard.loading import default_model_dir

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# family -> (template, {id: (new content, special)}, bos, eos)
FAMILIES: dict[str, tuple[str, dict[int, tuple[str, bool]], str, str]] = {
    "qwen": (
        "qwen.jinja",
        {
            3: ("<tool_call>", False),
            4: ("</tool_call>", False),
            5: ("<tool_response>", False),
            6: ("</tool_response>", False),
        },
        "<|im_start|>",
        "<|im_end|>",
    ),
    "llama3": (
        "llama3.jinja",
        {
            3: ("<|begin_of_text|>", True),
            4: ("<|start_header_id|>", True),
            5: ("<|end_header_id|>", True),
            6: ("<|eot_id|>", True),
            7: ("<|python_tag|>", True),
            8: ("<|eom_id|>", True),
        },
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "mistral": (
        "mistral.jinja",
        {
            3: ("<s>", True),
            4: ("</s>", True),
            5: ("[INST]", True),
            6: ("[/INST]", True),
            7: ("[TOOL_CALLS]", True),
            8: ("[AVAILABLE_TOOLS]", True),
            9: ("[/AVAILABLE_TOOLS]", True),
            10: ("[TOOL_RESULTS]", True),
            11: ("[/TOOL_RESULTS]", True),
        },
        "<s>",
        "</s>",
    ),
}


def family_tokenizer(family: str, directory: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer with ``family``'s chat template and special tokens."""
    template, renamed, bos, eos = FAMILIES[family]
    source = json.loads((default_model_dir() / "tokenizer.json").read_text())
    vocab = source["model"]["vocab"]
    for token in source["added_tokens"]:
        if token["id"] in renamed:
            content, special = renamed[token["id"]]
            del vocab[token["content"]]
            vocab[content] = token["id"]
            token["content"], token["special"] = content, special
    target = directory / family
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_text(json.dumps(source))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "chat_template": (TEMPLATES / template).read_text(),
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(target)
