"""Scorers rank visual tokens; each registers itself by name (`vtprune.methods()` lists them)."""

from vtprune.scorers import baselines, cls, fastv  # noqa: F401  (registration)
from vtprune.scorers.base import (
    HIDDEN_STATES,
    IN_LLM,
    LLM_ATTENTION,
    PIXEL_VALUES,
    PRE_LLM,
    SIGNALS,
    VISION_CLS_ATTENTION,
    Scorer,
    Signals,
    build_scorer,
    register,
    registry,
)
from vtprune.scorers.select import image_budget, select_topk

__all__ = [
    "HIDDEN_STATES",
    "IN_LLM",
    "LLM_ATTENTION",
    "PIXEL_VALUES",
    "PRE_LLM",
    "SIGNALS",
    "VISION_CLS_ATTENTION",
    "Scorer",
    "Signals",
    "build_scorer",
    "image_budget",
    "register",
    "registry",
    "select_topk",
]
