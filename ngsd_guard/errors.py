"""Exceptions raised by ngsd-guard.

NGSDError
├── ConfigError (also ValueError)          a setting is out of range or inconsistent
├── PromptError (also ValueError)          an empty or malformed prompt
├── ContextTooLongError (also ValueError)  the prompt does not fit the context window
├── IncompatibleTokenizerError             base and expert do not share a tokenizer
└── ModelNotFoundError (also FileNotFoundError)  a model, adapter or GGUF file is missing
"""

from __future__ import annotations


class NGSDError(Exception):
    """Base class of every error ngsd-guard raises on purpose."""


class ConfigError(NGSDError, ValueError):
    """A configuration value is invalid."""


class PromptError(NGSDError, ValueError):
    """A prompt is empty or cannot be rendered."""


class ContextTooLongError(NGSDError, ValueError):
    """The prompt is longer than the model's context window."""


class IncompatibleTokenizerError(NGSDError):
    """The expert's tokenizer differs from the base model's."""


class ModelNotFoundError(NGSDError, FileNotFoundError):
    """A model directory, adapter or weights file does not exist locally."""
