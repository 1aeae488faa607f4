"""`vtprune tune`: search a method's hyperparameters for one model and budget by hidden-state fidelity.

The objective is VFlowOpt's flow-guided one: over calibration samples, the mean cosine similarity
between the final hidden state (after the language model's last norm) of the last prompt token at
prefill, pruned vs unpruned. It needs no labels, so any images (and prompts) serve as calibration.

The search space is what the method's components declare (`Scorer.tunable`, qualified
``"<component>.<option>"``), plus the pruning layer for in-LLM methods. The search is seeded random
search with the method's defaults as the first trial, so the tuned setting is never worse than the
defaults on the calibration set. (VFlowOpt's reference uses Gaussian-process Bayesian optimisation with
scikit-optimize; random search needs no extra dependency and is what is implemented here.)

The result is saved as a JSON file holding the `PruneConfig` and the search record;
``vtprune.apply(model, config="tuned.json")`` loads it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtprune.config import TUNED_FORMAT, ConfigError, PruneConfig, is_config_path, load_config
from vtprune.tunable import Param

# Param (vtprune.tunable), load_config and is_config_path (vtprune.config) live lower down: re-exported here
__all__ = ["Param", "TuneResult", "calibration_batches", "fidelity", "is_config_path", "load_config",
           "random_search", "search_space", "tune"]


@dataclass
class TuneResult:
    """The best configuration found, its objective, the defaults' objective and every trial."""

    config: PruneConfig
    objective: float
    baseline: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"format": TUNED_FORMAT, "config": self.config.to_dict(), "objective": self.objective,
                "baseline": self.baseline, "samples": self.samples, "trials": self.trials}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def search_space(model: Any, method: str, options: dict[str, Any] | None = None,
                 layer: int | None = None) -> tuple[dict[str, Param], dict[str, Any]]:
    """The searched parameters of ``method`` on ``model`` and their starting (default) values.

    Keys are ``"layer"`` (in-LLM methods whose layer is not fixed by ``layer``) and qualified option names
    ``"<component>.<option>"``. Options given in ``options`` are held fixed, not searched.
    """
    from vtprune.adapters import adapter_for
    from vtprune.scorers import IN_LLM, build_scorer
    from vtprune.scorers.compose import Wrapper

    options = dict(options or {})
    adapter = adapter_for(model)
    scorer = build_scorer(method, options)
    scorer.bind(model, adapter)
    space: dict[str, Param] = {}
    start: dict[str, Any] = {}
    fixed = {k.split(".")[-1] for k in options}
    node = scorer
    while node is not None:
        for name, (param, default) in node.tunable(model, adapter).items():
            if name in fixed:
                continue
            space[f"{node.name}.{name}"] = param
            start[f"{node.name}.{name}"] = default
        node = node.inner if isinstance(node, Wrapper) else None
    default_layer = scorer.default_layer
    if layer is None and default_layer is not None and IN_LLM in scorer.stages:  # in-LLM by default
        n = len(adapter.decoder_layers())
        lo = adapter.min_layer()
        space["layer"] = Param("int", lo, n - 2)
        start["layer"] = min(max(default_layer, lo), n - 2)
    return space, start


def _last_token_states(model: Any, batches: Sequence[dict]) -> torch.Tensor:
    """``[samples, D]`` float32: the final-norm output at the last position of each (left-padded) prompt."""
    from vtprune.adapters import adapter_for

    core = adapter_for(model).core()
    norm = getattr(core, "language_model", core).norm
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].float().cpu()))
    try:
        with torch.no_grad():
            for inputs in batches:
                model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


def fidelity(model: Any, batches: Sequence[dict], config: PruneConfig, reference: torch.Tensor) -> float:
    """Mean cosine similarity of the pruned last-token final states to ``reference`` ``[samples, D]``."""
    import vtprune

    vtprune.apply(model, config)
    try:
        states = _last_token_states(model, batches)
    finally:
        vtprune.remove(model)
    return float(torch.nn.functional.cosine_similarity(states, reference, dim=-1).mean())


def random_search(space: dict[str, Param], start: dict[str, Any], objective: Callable[[dict[str, Any]], float],
                  trials: int, seed: int = 0) -> list[tuple[dict[str, Any], float]]:
    """Evaluate ``start`` then ``trials - 1`` seeded random points of ``space``; returns (point, value) in
    evaluation order (a point seen before is not evaluated again)."""
    rng = random.Random(seed)
    done: list[tuple[dict[str, Any], float]] = []
    seen: set[str] = set()
    point = dict(start)
    attempts = 0
    while len(done) < max(1, trials) and attempts < 50 * max(1, trials):
        attempts += 1
        key = json.dumps(point, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            done.append((point, objective(point)))
        point = {name: p.sample(rng) for name, p in space.items()}
    return done


def tune(
    model: Any,
    batches: Sequence[dict],
    method: str,
    keep: int | float | str,
    *,
    trials: int = 16,
    seed: int = 0,
    layer: int | None = None,
    options: dict[str, Any] | None = None,
    progress: Callable[[int, dict[str, Any], float], None] | None = None,
) -> TuneResult:
    """Search ``method``'s hyperparameters at budget ``keep`` on ``model`` over calibration ``batches``.

    Args:
        batches: processor outputs (left padded, so the last position is each prompt's last token).
        trials: configurations evaluated, the defaults first.
        layer: fix the in-LLM layer instead of searching it.
        options: method options held fixed.
        progress: called as ``progress(i, point, value)`` after each trial.

    Raises `ConfigError` when the method has nothing to tune.
    """
    import vtprune

    vtprune.remove(model)
    space, start = search_space(model, method, options, layer)
    if not space:
        raise ConfigError(
            f"method {method!r} has no tunable hyperparameters on this model (pre-LLM, no searched options); "
            "tune an in-LLM method (its layer) or one with options, e.g. 'visionzip', 'vtc-cls', 'debias+fastv'"
        )
    reference = _last_token_states(model, batches)

    def config_of(point: dict[str, Any]) -> PruneConfig:
        opts = dict(options or {})
        opts.update({k: v for k, v in point.items() if k != "layer"})
        return PruneConfig(method=method, keep=keep, layer=point.get("layer", layer), options=opts)

    record: list[dict[str, Any]] = []

    def objective(point: dict[str, Any]) -> float:
        value = fidelity(model, batches, config_of(point), reference)
        record.append({"point": point, "objective": value})
        if progress is not None:
            progress(len(record) - 1, point, value)
        return value

    results = random_search(space, start, objective, trials, seed)
    best_point, best = max(results, key=lambda pv: pv[1])  # max keeps the first of equal values
    return TuneResult(config=config_of(best_point), objective=best, baseline=results[0][1], trials=record,
                      samples=int(reference.shape[0]))


def calibration_batches(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str] | None = None,
                        batch_size: int = 8) -> list[dict]:
    """Left-padded processor batches of one-image prompts in the model's format (``questions`` cycle; default:
    a generic question)."""
    from vtprune.loading import QUESTION, default_prompt

    if not images:
        raise ConfigError("tune needs at least one calibration image")
    questions = list(questions or [QUESTION])
    processor.tokenizer.padding_side = "left"
    out = []
    for a in range(0, len(images), batch_size):
        chunk = list(images[a:a + batch_size])
        text = [default_prompt(model, processor, questions[(a + i) % len(questions)]) for i in range(len(chunk))]
        out.append(dict(processor(images=chunk, text=text, return_tensors="pt", padding=True)))
    return out
