"""vtprune: training-free visual token pruning for multimodal LLMs.

    import vtprune
    vtprune.apply(model, method="fastv", keep=64, layer=2)
"""

from vtprune.adapters import UnsupportedModelError, supported_model_types
from vtprune.api import apply, config_of, disabled, methods, remove, stats
from vtprune.config import ConfigError, PruneConfig
from vtprune.state import PruneStats

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PruneConfig",
    "PruneStats",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "config_of",
    "disabled",
    "methods",
    "remove",
    "stats",
    "supported_model_types",
]
