"""Cacheless continuations: a forward without a KV cache that extends the previous one's prompt.

``generate(use_cache=False)`` feeds the whole sequence (prompt + the tokens generated so far) at every
step, and the same happens when a caller scores a prompt and then the prompt plus an answer without a
cache (log-likelihood evaluation). Each such forward looks like a new prefill; re-selecting there would
pick tokens for a query that is a generated token, so the answer would differ from the cached run's and
`vtprune.stats` would describe the last step. A continuation instead reuses the prompt's plan:

- it is recognised on the host, from the prompt's input ids read in the prefill's one device read: same
  batch, the previous cacheless forward's ids and validity as a prefix, only real text tokens appended;
- text signals (the query row, instruction tokens, raters) come from the prompt only
  (`Session.prompt_valid`; the query is the prompt's last token);
- every top-k pruning point reuses the prompt's `Selection` (`Session.replay`); methods that select
  themselves recompute from the same prompt-only signals;
- the model's stats stay the prompt's.
"""

from __future__ import annotations

import dataclasses

import torch

from vtprune.layout import VisualLayout
from vtprune.scorers.select import Selection
from vtprune.state import Session


def appended_tokens(prev: Session, ids: torch.Tensor, valid: torch.Tensor, kinds: torch.Tensor) -> int:
    """How many tokens ``ids`` (``[B, M]`` host input ids of a cacheless forward, ``valid``/``kinds`` its host
    validity and token kinds) appends to ``prev``'s prompt; 0 when it is not a continuation of it."""
    prompt = prev.prompt_ids
    if prompt is None or ids.shape[0] != prompt.shape[0] or ids.shape[1] <= prompt.shape[1]:
        return 0
    n = prompt.shape[1]
    if not (torch.equal(ids[:, :n], prompt) and torch.equal(valid[:, :n], prev.prompt_host_valid)):
        return 0
    if not (bool(valid[:, n:].all()) and not bool(kinds[:, n:].any())):  # only real text tokens appended
        return 0
    return int(ids.shape[1] - n)


def begin_continuation(sess: Session, prev: Session, ids: torch.Tensor, valid: torch.Tensor, kinds: torch.Tensor,
                       stats) -> None:
    """Record on the new session ``sess`` of a cacheless forward (``ids``/``valid``/``kinds``: its host input
    ids, validity and token kinds) the prompt it continues: ``prev``'s when it extends that prompt (its
    selections are replayed, its ``stats`` stay the model's), otherwise its own ids, as a new prompt."""
    appended = appended_tokens(prev, ids, valid, kinds)
    if appended:
        sess.prompt_ids, sess.prompt_host_valid = prev.prompt_ids, prev.prompt_host_valid
        sess.appended = appended
        sess.replay = prev.selections if prev.replay is None else prev.replay
        sess.prompt_stats = prev.prompt_stats if prev.appended else stats
    else:
        sess.prompt_ids, sess.prompt_host_valid = ids, valid


def replayed_selection(sess: Session, point, layout: VisualLayout) -> Selection | None:
    """The prompt's `Selection` at pruning ``point`` (``"pre"`` or an in-LLM stage index) rebound to the
    continuation's ``layout`` (the same visual tokens at the same positions, in a longer sequence: padding
    slots of `VisualLayout.padded` point one past *its* end, not at the first appended token); None when
    this forward is not a continuation."""
    if sess.replay is None or point not in sess.replay:
        return None
    return dataclasses.replace(sess.replay[point], layout=layout)
