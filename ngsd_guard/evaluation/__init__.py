"""The evaluation harness: named sets, base-alone vs guarded, the keyword judge's metrics."""

from .runner import evaluate_set, format_summary, format_table, side_metrics
from .sets import NAMED_SETS, EvalSet, load_set

__all__ = [
    "NAMED_SETS",
    "EvalSet",
    "evaluate_set",
    "format_summary",
    "format_table",
    "load_set",
    "side_metrics",
]
