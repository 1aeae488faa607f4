"""The public one-liners: `apply`, `remove`, `disabled`, `stats`, `methods`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from vtprune.adapters import adapter_for
from vtprune.config import ConfigError, PruneConfig, auto_keep, is_config_path, load_config
from vtprune.runtime import install
from vtprune.scorers import IN_LLM, PRE_LLM, Scorer, build_scorer, method_string, registry
from vtprune.scorers.compose import scorer_config_options
from vtprune.state import STATE_ATTR, PruneState, PruneStats


def apply(
    model: nn.Module,
    config: PruneConfig | str | Scorer | None = None,
    *,
    method: str | None = None,
    keep: int | float | str | None = None,
    layer: int | None = None,
    **method_options: Any,
) -> nn.Module:
    """Patch ``model`` in place to prune visual tokens; returns the same model.

    Either pass a `PruneConfig` (``apply(model, PruneConfig(...))``), the path of a config file (``apply(model,
    config="tuned.json")``, as `vtprune tune` writes it), or keywords
    (``apply(model, method="fastv", keep=64, layer=2, **method_options)``; the method may also be the
    second positional argument, as a string such as ``"debias+sink+fastv"`` or as a scorer object such
    as ``Debias(Sink(FastV()))``). Only this instance changes; applying again replaces the previous
    setup. Raises `ConfigError` for a bad configuration and `UnsupportedModelError` for a model
    vtprune cannot patch.
    """
    given_scorer = None
    if is_config_path(config):  # a file written by `vtprune tune` (or PruneConfig.to_json)
        config = load_config(config)
    if isinstance(config, Scorer):
        if method is not None or method_options:
            raise ConfigError("a scorer object carries its own method and options: do not pass method= or options too")
        given_scorer, config = config, method_string(config)
        method_options = scorer_config_options(given_scorer)
    if isinstance(config, PruneConfig):
        if method is not None or keep is not None or layer is not None or method_options:
            raise ConfigError("pass either a PruneConfig or keyword arguments to vtprune.apply, not both")
        cfg = config
    else:
        if config is not None and not isinstance(config, str):
            raise ConfigError(
                "the second argument of vtprune.apply must be a PruneConfig, a method name or a scorer object, "
                f"got {type(config).__name__}"
            )
        if config is not None and method is not None:
            raise ConfigError("the method was given twice (positionally and as method=)")
        # explicit None checks: an empty method string is an error (PruneConfig refuses it), not the default
        chosen = config if config is not None else method if method is not None else PruneConfig.method
        fields: dict[str, Any] = {"method": chosen, "options": method_options}
        if keep is not None:
            fields["keep"] = keep
        fields["layer"] = layer
        cfg = PruneConfig(**fields)

    adapter = adapter_for(model)
    scorer = given_scorer if given_scorer is not None else build_scorer(cfg.method, cfg.options)
    adapter.check_scorer(scorer)
    if auto_keep(cfg.keep) is not None and not scorer.accepts_auto_keep:
        raise ConfigError(
            f"keep={cfg.keep!r}: method {cfg.method!r} places a fixed number of tokens per image itself, so an "
            "adaptive budget cannot be chosen from its scores; give an int or a fraction, or pick a "
            "score-based method (fastv, cls, vtc-cls, random, debias+..., ensemble)"
        )
    scorer.bind(model, adapter)  # first: a scorer's default layer may depend on the model (flowcut)
    resolved_layer = cfg.layer if cfg.layer is not None else scorer.default_layer
    if cfg.layer is None and resolved_layer is not None:
        # a model may forbid early layers (Qwen3-VL's deepstack): the default moves to its first allowed layer
        resolved_layer = max(resolved_layer, adapter.min_layer())
    stage = PRE_LLM if resolved_layer is None else IN_LLM
    if stage not in scorer.stages:
        if stage == IN_LLM:
            raise ConfigError(
                f"method {cfg.method!r} prunes before the LLM and takes no layer; leave layer=None"
            )
        raise ConfigError(f"method {cfg.method!r} prunes inside the LLM: give layer=K")
    schedule: list = []
    if resolved_layer is not None:
        schedule = list(scorer.schedule(model, adapter, resolved_layer, cfg.keep))  # may explain its layers
        adapter.check_layer(resolved_layer)
        layers = [k for k, _ in schedule]
        if not layers or layers != sorted(set(layers)):
            raise ConfigError(f"method {cfg.method!r}: its pruning layers {layers} must be distinct and increasing")
        for k in layers:
            adapter.check_layer(k)
        resolved_layer = layers[0]
    pre_keep = None
    if stage == PRE_LLM:
        pre_keep, schedule = scorer.llm_stages(model, adapter, cfg.keep)
        schedule = list(schedule)
        layers = [k for k, _ in schedule]
        if layers != sorted(set(layers)):
            raise ConfigError(f"method {cfg.method!r}: its LLM pruning layers {layers} must be distinct and increasing")
        for k in layers:
            adapter.check_layer(k)

    remove(model)
    state = PruneState(config=cfg, adapter=adapter, scorer=scorer, stage=stage, layer=resolved_layer,
                       schedule=schedule, pre_keep=pre_keep)
    state.saved = [(obj, name, getattr(obj, name, _MISSING)) for obj, name in adapter.mutable_state()]
    state.handles = install(adapter, state)
    setattr(model, STATE_ATTR, state)
    return model


_MISSING = object()


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: remove every hook and the state; the model behaves exactly as before. Idempotent."""
    state: PruneState | None = getattr(model, STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        for obj, name, value in state.saved:  # attributes the runtime overwrote (Qwen's rope_deltas)
            if value is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)
        delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` unpruned inside the block (for A/B comparisons); pruning resumes afterwards."""
    state: PruneState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        yield model
        return
    previous = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = previous


def stats(model: nn.Module) -> PruneStats | None:
    """What the last prefill pruned (`PruneStats`), or None (not patched, or no image seen yet)."""
    state: PruneState | None = getattr(model, STATE_ATTR, None)
    return state.stats if state is not None else None


def config_of(model: nn.Module) -> PruneConfig | None:
    """The `PruneConfig` a model is patched with, or None."""
    state: PruneState | None = getattr(model, STATE_ATTR, None)
    return state.config if state is not None else None


def methods() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: cls.description for name, cls in sorted(registry().items())}
