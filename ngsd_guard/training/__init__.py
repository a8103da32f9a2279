"""Training the safety expert (LoRA) and the hidden-state risk probe: ``train-expert``."""

from .data import BuildConfig, Example, Seeds, build_dataset, load_seeds, recovery_response
from .expert import train_expert
from .probe import fit_probe, probe_features
from .trainer import LoraSettings, collate, train_lora, wrap_lora

__all__ = [
    "BuildConfig",
    "Example",
    "LoraSettings",
    "Seeds",
    "build_dataset",
    "collate",
    "fit_probe",
    "load_seeds",
    "probe_features",
    "recovery_response",
    "train_expert",
    "train_lora",
    "wrap_lora",
]
