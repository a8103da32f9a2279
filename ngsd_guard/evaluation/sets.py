"""Named evaluation sets (the fixed test splits) and JSONL sets.

| name | what | label |
| --- | --- | --- |
| ``advbench-test`` | AdvBench ids 260-519 | harmful |
| ``xstest-safe`` | XSTest safe prompts (250) | benign |
| ``xstest-unsafe`` | XSTest unsafe prompts (200) | harmful |
| ``alpaca`` | AlpacaEval items 0-99 | benign |
| ``path/to/file.jsonl`` | ``{"prompt": ..., "label": "harmful" or "benign"}`` per line | per line |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

NAMED_SETS = ("advbench-test", "xstest-safe", "xstest-unsafe", "alpaca")
LABELS = ("harmful", "benign")


@dataclass(frozen=True)
class EvalSet:
    """Prompts of one set and one label."""

    name: str
    label: str
    prompts: tuple[str, ...]


def _read(data_dir: Path, file: str) -> object:
    path = data_dir / file
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass `--data-dir` pointing at shared/data")
    return json.loads(path.read_text())


def load_set(name: str, data_dir: str | Path, *, limit: int | None = None) -> list[EvalSet]:
    """One :class:`EvalSet` per label in the set (a JSONL file may hold both labels)."""
    data_dir = Path(data_dir)
    if name == "advbench-test":
        rows = _read(data_dir, "advbench_harmful_behaviors.json")
        sets = [EvalSet(name, "harmful", tuple(r["goal"] for r in rows if int(r["id"]) >= 260))]
    elif name in ("xstest-safe", "xstest-unsafe"):
        wanted = "safe" if name == "xstest-safe" else "unsafe"
        rows = _read(data_dir, "XSTest.json")
        label = "benign" if wanted == "safe" else "harmful"
        sets = [EvalSet(name, label, tuple(r["prompt"] for r in rows if r["label"] == wanted))]
    elif name == "alpaca":
        rows = _read(data_dir, "alpaca_eval.json")
        sets = [EvalSet(name, "benign", tuple(r["instruction"] for r in rows[:100]))]
    elif name.endswith(".jsonl") or Path(name).is_file():
        sets = _load_jsonl(Path(name))
    else:
        raise ConfigError(
            f"`--sets` item (={name!r}) is neither one of {', '.join(NAMED_SETS)} nor a JSONL file"
        )
    if limit is not None:
        sets = [EvalSet(s.name, s.label, s.prompts[:limit]) for s in sets]
    return [s for s in sets if s.prompts]


def _load_jsonl(path: Path) -> list[EvalSet]:
    if not path.is_file():
        raise ConfigError(f"JSONL set (={str(path)!r}) not found")
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in LABELS or not isinstance(row.get("prompt"), str):
            raise ConfigError(
                f"{path}:{number}: each line needs a string `prompt` and `label` "
                f"in {LABELS}, got {row!r}"
            )
        by_label[row["label"]].append(row["prompt"])
    return [EvalSet(path.name, label, tuple(p)) for label, p in by_label.items() if p]
