"""Where requests come from: the shared datasets and the project's own lists, each read on one
side of :mod:`ngsd_guard.splits`. Training and evaluation both read requests through here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import splits
from .errors import ConfigError
from .splits import Split

PROJECT_DATA = Path(__file__).parent / "data" / "training"
SELF_HARM = "self_harm"


@dataclass(frozen=True)
class Request:
    """One request, its harm category (``""`` for benign ones) and where it comes from."""

    text: str
    category: str = ""
    source: str = ""


def _read_json(data_dir: Path, file: str) -> object:
    path = Path(data_dir) / file
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass `--data-dir` pointing at shared/data")
    return json.loads(path.read_text())


def _read_jsonl(data_dir: Path, file: str) -> list[dict]:
    path = Path(data_dir) / file
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass `--data-dir` pointing at shared/data")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seed_reject(data_dir: Path) -> list[Request]:
    """The 36 seed harmful prompts (training only), with their categories."""
    rows = _read_json(data_dir, "seed_reject.json")["prompts"]
    category = {"Self-harm": SELF_HARM}
    return [
        Request(r["prompt"], category.get(r["category"], r["category"]), "seed_reject")
        for r in rows
    ]


def advbench(data_dir: Path, split: Split) -> list[Request]:
    ids = splits.ADVBENCH_TRAIN_IDS if split == "train" else splits.ADVBENCH_TEST_IDS
    rows = _read_json(data_dir, "advbench_harmful_behaviors.json")
    return [Request(r["goal"], "advbench", "advbench") for r in rows if int(r["id"]) in ids]


def donotanswer(data_dir: Path, split: Split) -> list[Request]:
    """Do-Not-Answer's harm categories, every fifth request of each file held out; a request
    that occurs twice belongs to the split of its first occurrence."""
    out, first_split = [], {}
    for file in splits.DONOTANSWER_HARM_FILES:
        rows = _read_jsonl(data_dir, f"donotanswer/{file}")
        category = file.removesuffix(".jsonl")
        for i, row in enumerate(rows):
            key = " ".join(row["prompt"].lower().split())
            side = first_split.setdefault(key, splits.donotanswer_split(i))
            if side == split:
                out.append(Request(row["prompt"], category, "donotanswer"))
    return out


def alpaca(data_dir: Path, split: Split) -> list[Request]:
    rows = _read_json(data_dir, "alpaca_eval.json")
    if split == "eval":
        return [Request(rows[i]["instruction"], source="alpaca") for i in splits.ALPACA_TEST_ITEMS]
    return [Request(r["instruction"], source="alpaca") for r in rows[splits.ALPACA_TRAIN_START :]]


def xstest(data_dir: Path, label: str) -> list[Request]:
    """XSTest (evaluation only): ``safe`` or ``unsafe`` prompts."""
    rows = _read_json(data_dir, "XSTest.json")
    return [Request(r["prompt"], r.get("type", ""), "xstest") for r in rows if r["label"] == label]


def project(label: str, split: Split) -> list[Request]:
    """The project's own requests (``harmful`` or ``benign``), every fourth held out."""
    if label not in ("harmful", "benign"):
        raise ConfigError(f"`label` (={label!r}) must be 'harmful' or 'benign'")
    rows = json.loads((PROJECT_DATA / f"{label}_requests.json").read_text())["requests"]
    return [
        Request(r["text"], r["category"] if label == "harmful" else "", f"project-{label}")
        for i, r in enumerate(rows)
        if splits.project_split(i) == split
    ]
