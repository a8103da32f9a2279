"""ngsd-guard: Neuron-Guided Safe Decoding for locally run language models."""

from .alpha import AlphaPolicy, Assessment, FixedAlpha
from .config import DecodingConfig, GateConfig, GuardConfig, InterventionConfig
from .constraints import TokenConstraint
from .errors import (
    ConfigError,
    ContextTooLongError,
    IncompatibleTokenizerError,
    ModelNotFoundError,
    NGSDError,
    PromptError,
)
from .guarded import (
    AsyncTokenStream,
    BatchStream,
    GenerateOptions,
    GenerationRequest,
    GuardedLM,
    TokenStream,
)
from .records import GateEvent, Generation, StepRecord, Summary

__all__ = [
    "AlphaPolicy",
    "Assessment",
    "AsyncTokenStream",
    "BatchStream",
    "ConfigError",
    "ContextTooLongError",
    "DecodingConfig",
    "FixedAlpha",
    "GateConfig",
    "GateEvent",
    "GenerateOptions",
    "GenerationRequest",
    "Generation",
    "GuardConfig",
    "GuardedLM",
    "IncompatibleTokenizerError",
    "InterventionConfig",
    "ModelNotFoundError",
    "NGSDError",
    "PromptError",
    "StepRecord",
    "Summary",
    "TokenConstraint",
    "TokenStream",
]
