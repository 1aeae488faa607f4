"""Model adapters, picked by ``config.model_type`` (`adapter_for`)."""

from vtprune.adapters import llava, llava_repo, qwen  # noqa: F401  (registration)
from vtprune.adapters.base import (
    Adapter,
    ImageTokens,
    UnsupportedModelError,
    adapter_for,
    check_layer,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "Adapter",
    "ImageTokens",
    "UnsupportedModelError",
    "adapter_for",
    "check_layer",
    "register_adapter",
    "supported_model_types",
]
