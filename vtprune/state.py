"""Per-model pruning state: the one object vtprune attaches to a patched model, and the stats it records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vtprune.perthread import PerThread

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter
    from vtprune.config import PruneConfig
    from vtprune.scorers.base import Scorer

STATE_ATTR = "_vtprune_state"
# transformers >= 5.24 passes `cache`, earlier 5.x and 4.x models `past_key_values`, 4.x decoder layers
# `past_key_value`
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a model or layer call was given, under any of transformers' names (or None)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens held by ``layer`` of a KV cache: a ``Cache`` object (4.x or 5.x) or a 4.x legacy tuple.

    transformers 4.x models given a legacy ``((key, value), ...)`` tuple return one, with each layer's
    tensors ``[B, H, T, d]``; layers may hold different lengths after in-LLM pruning.
    """
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[layer][0].shape[-2]) if len(cache) > layer else 0
    return int(cache.get_seq_length(layer))


@dataclass
class PruneStats:
    """What the last prefill pruned.

    - ``kept``: one sorted LongTensor per sample: indices into that sample's visual tokens (image
      placeholder tokens in sequence order, all images of the sample concatenated) that survived.
    - ``visual_before`` / ``visual_after``: visual token counts per sample.
    - ``seq_len_before`` / ``seq_len_after``: sequence lengths per sample (padding excluded) seen by the
      first and the last decoder layer.
    - ``stage``: ``"pre-llm"`` (between the vision tower and the LLM) or ``"llm"`` (inside the LLM).
    - ``layer``: for ``"llm"``, the decoder layer after which tokens were dropped; None for pre-LLM.
    - ``contextual``: per sample, how many of the kept visual tokens carry merged features (VisionZip's
      contextual tokens; counted in ``visual_after``); None for methods that do not merge.
    - ``per_image``: per sample, the kept count of each of its images (the count an adaptive budget
      ``keep="auto:0.95"`` chose per image; also filled for fixed budgets).
    - ``stages``: staged in-LLM methods: per stage ``{"layer": K_j, "visual_after": [...], "kept": [...]}``
      (``kept`` as above, after that stage; ``layer`` is
      then the first stage's layer, ``kept`` the last stage's); None for single-stage pruning.
    - ``scores``: per sample the scorer's ``[n_b]`` scores of that sample's visual tokens (higher =
      keep; ``-inf`` = excluded), as the selection saw them, on the model's device; None where the
      method selects without a score vector (VisionZip's dominant + contextual merge).
    """

    method: str
    stage: str
    layer: int | None
    kept: list[torch.Tensor]
    visual_before: list[int]
    visual_after: list[int]
    seq_len_before: list[int]
    seq_len_after: list[int]
    contextual: list[int] | None = None
    scores: list[torch.Tensor] | None = None
    per_image: list[list[int]] | None = None
    stages: list[dict] | None = None

    @property
    def exit_layers(self) -> list[int | None]:
        """Per sample the decoder layer after which it had no visual token left (a visual-token exit,
        ``dyvte``), None where some remain or where it had none to begin with."""
        stages = self.stages or ([{"layer": self.layer, "visual_after": self.visual_after}] if self.stage != "pre-llm"
                                 else [])
        out: list[int | None] = []
        for b, before in enumerate(self.visual_before):
            gone = [s["layer"] for s in stages if s["layer"] is not None and s["visual_after"][b] == 0]
            out.append(gone[0] if before and gone else None)
        return out

    @property
    def keep_ratio(self) -> float:
        before = sum(self.visual_before)
        return sum(self.visual_after) / before if before else 1.0

    def summary(self) -> str:
        where = "before the LLM" if self.stage == "pre-llm" else f"after LLM layer {self.layer}"
        if self.stages:
            names = ["before the LLM" if s["layer"] is None else f"after LLM layer {s['layer']}" for s in self.stages]
            where = "in stages: " + ", ".join(names)
        per = ", ".join(f"{a}/{b}" for a, b in zip(self.visual_after, self.visual_before))
        merged = f", of which {', '.join(map(str, self.contextual))} contextual" if self.contextual else ""
        return f"{self.method}: kept {per} visual tokens per sample{merged} ({where})"


@dataclass
class Session:
    """State of one prefill and the decode steps that follow it (reset at every new prefill)."""

    phase: str = "off"  # "off" | "prefill" | "decode"
    decoded: int = 0  # tokens fed after the prefill (host count: a static cache's own length is on the device)
    cache: Any = None  # the cache the next decode step must pass (identity check): the DynamicCache this
    # prefill filled, or on transformers 4.x with legacy tuples the tuple the model returned last
    step_cache: Any = None  # the cache object the decoder layers of the current call update
    layout: Any = None  # VisualLayout of the prefill
    attention_2d: torch.Tensor | None = None  # [B, N] bool, True on real (non-padding) tokens
    host_valid: torch.Tensor | None = None  # the same on the host (read once per prefill)
    query_pos: torch.Tensor | None = None  # [B] position of the last prompt token of each sample
    seq_len: int = 0  # N, full prefill length
    llm_len: int = 0  # the prefill length the decoder layers see: N, or N' after pre-LLM shortening
    origin: Any = None  # pre-LLM then in-LLM methods: (the original VisualLayout, per sample the kept indices
    # into it) once the LLM stages run on the shortened sequence
    kinds: torch.Tensor | None = None  # [B, N] long: 0 text, 1 image token, 2 video token (Adapter.token_kinds)
    host_kinds: torch.Tensor | None = None  # the same on the host (read once per prefill)
    # in-LLM
    llm_attention: list[torch.Tensor] | None = None
    keep_seq: torch.Tensor | None = None  # [B, N'] kept sequence positions (fillers included)
    filler: torch.Tensor | None = None  # [B, N'] bool, True on filler slots of ragged batches
    ragged: bool = False  # whether any stage has filler slots (host flag, fixed at prefill)
    full_hidden: torch.Tensor | None = None  # [B, N, D] output of the pruning layer (for scatter back)
    # staged in-LLM pruning: per applied stage (keep_seq, filler), its kept visual indices, and for stages
    # after the first the pruning layer's output in the previous stage's coordinates (for scatter back)
    stage_seqs: list = field(default_factory=list)
    stage_kept: list = field(default_factory=list)
    stage_hidden: list = field(default_factory=list)
    stage_ragged: list = field(default_factory=list)  # per applied stage: whether its plan has fillers
    stage_rope: Any = None  # (cos, sin) of the current pruning layer's call, for scorers reading layer K + 1
    mask_cache: dict = field(default_factory=dict)  # prefill: gathered masks/RoPE per stage
    step_masks: dict = field(default_factory=dict)  # decode: per stage the current step's mask (reset per step)
    # pre-LLM
    pre_index: torch.Tensor | None = None  # [B, N'] kept positions of the shortened sequence
    pre_valid: torch.Tensor | None = None  # [B, N'] bool, False on padding slots
    next_position: torch.Tensor | None = None  # [B, 1] Qwen-VL pre-LLM: the position after the prompt's last
    pre_removed: torch.Tensor | None = None  # [B] real tokens removed per sample
    pre_ragged: bool = False  # whether the shortened rows were re-padded (host flag)
    deepstack: Any = None  # Qwen3-VL pre-LLM: (visual mask [B, N'], per-level features of kept tokens)
    extras: dict = field(default_factory=dict)  # method-specific per-prefill values (FlowCut's, see
    # runtime/flowcut.py), offered to the scorer as `Signals.extras`
    # cacheless continuations (generate(use_cache=False) feeds prompt + generated tokens at every step):
    prompt_ids: torch.Tensor | None = None  # [B, P] host input ids of the prompt (forwards without a cache)
    prompt_host_valid: torch.Tensor | None = None  # [B, P] host validity of the prompt
    appended: int = 0  # tokens this forward adds after the prompt (0: a new prompt); signals ignore them
    selections: dict = field(default_factory=dict)  # per pruning point ("pre", or stage j) the Selection made
    replay: dict | None = None  # a continuation: the prompt's selections, reused so that the plan is the prompt's
    prompt_stats: Any = None  # a continuation: the prompt's stats, which stay the model's stats

    def prompt_valid(self) -> torch.Tensor:
        """``[B, N_cur]`` bool: real tokens of the prompt in the current coordinates (the tokens a
        continuation appended excluded: text signals, such as raters or instructions, come from the prompt)."""
        if not self.appended:
            return self.attention_2d
        cols = torch.arange(self.attention_2d.shape[1], device=self.attention_2d.device)
        return self.attention_2d & (cols[None, :] <= self.query_pos[:, None])

    def host_prompt_valid(self) -> torch.Tensor:
        """`prompt_valid` of the original sequence, on the host: ``[B, N]``."""
        if not self.appended:
            return self.host_valid
        valid = self.host_valid.clone()
        for b in range(valid.shape[0]):
            real = torch.nonzero(valid[b]).flatten()
            valid[b, real[real.numel() - self.appended:]] = False
        return valid


@dataclass
class VisionRecord:
    """One run of the model's ``get_image_features``: what the pruning step needs from it later.

    transformers' ``generate()`` encodes the images *before* the prefill forward and passes only the
    features on, so the image geometry and the CLS rows are recorded here when the encoder runs.
    """

    output: Any  # the returned BaseModelOutputWithPooling (features in .pooler_output)
    geometry: Any  # image_sizes (LLaVA-NeXT tiles) or grid_thw (Qwen-VL), as passed to the encoder
    strategy: str | None  # vision_feature_select_strategy as passed
    n_images: int
    cls_attention: torch.Tensor | None  # encoder-side scores, if recorded: [tiles, patches + 1] CLS rows
    # (LLaVA) or [merged tokens, 1] attention received (Qwen-VL); see Adapter.vision_scores
    features: list = field(default_factory=list)  # the per-image feature tensors as returned (not expanded)
    pixel_values: Any = None  # the pixel input of the encoder call, as given (a reference, not a copy)
    extras: dict = field(default_factory=dict)  # method-specific tensors recorded during the call
    # (VisionZip's keys, see runtime/visionzip.py)


_NO_TIMING = contextlib.nullcontext()


class PartTimer:
    """Wall-clock seconds vtprune spends in its own pruning work, by part, while ``enabled``.

    - ``"score"``: computing the signals a scorer needs (the recomputed attention rows, CLS rows),
      scoring and selecting the kept tokens.
    - ``"compact"``: gathering the kept tokens, their positions, RoPE tables and masks, and scattering
      the final hidden states back.
    - ``"plan"``: building the prefill's layout from the host copy of the token kinds.

    Off by default (one attribute check per part). With ``cuda=True`` each part is bracketed by
    device synchronisations, so `vtprune bench` enables it only for a separate profiling pass.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.cuda = False
        self.seconds: dict[str, float] = {}

    def part(self, name: str) -> contextlib.AbstractContextManager:
        """A context timing part ``name``; a shared no-op context while disabled (the hot path: decode
        steps enter one per hooked layer)."""
        return self._timed(name) if self.enabled else _NO_TIMING

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class PruneState:
    """Everything vtprune keeps on a patched model (``model._vtprune_state``): the setup (shared by all
    threads) and the per-call state (one copy per calling thread)."""

    config: PruneConfig
    adapter: Adapter
    scorer: Scorer
    stage: str  # "pre-llm" | "llm"
    layer: int | None
    handles: list = field(default_factory=list)
    saved: list = field(default_factory=list)  # (object, attribute, value before apply) for `remove`
    enabled: bool = True
    timer: PartTimer = field(default_factory=PartTimer)  # vtprune's own time by part (vtprune bench)
    # in-LLM pruning points: (decoder layer, per-image budget) in increasing layer order; one entry
    # (layer, config.keep) for single-stage methods, several for staged ones (Scorer.schedule)
    schedule: list = field(default_factory=list)
    pre_keep: Any = None  # the pre-LLM selection's budget when LLM stages follow it (None: config.keep)
    # the form of attention mask the LLM's layers take ("4d", "2d", "flex": runtime/llm_stages.mask_contract),
    # resolved once when the hooks are installed
    attention_contract: str = "4d"

    # Per-call state, private to each calling thread (`vtprune.perthread`): two threads running the same
    # patched model never see each other's prefill. Not dataclass fields (no annotations).
    session = PerThread(factory=Session)
    vision_record = PerThread()  # VisionRecord | None: the last image encoding
    video_record = PerThread()  # VisionRecord | None: the last video encoding (Qwen-VL)
    cls_accumulator = PerThread()  # torch.Tensor | None
    vision_extras = PerThread()  # dict | None: filled by method hooks during an encoder call -> VisionRecord.extras
    pending_labels = PerThread()  # torch.Tensor | None: a forward's labels, held for runtime/labels.py
    encoding = PerThread(False)  # inside a wrapped encoder call (Qwen3-VL's video encoder calls the image one)
    # PruneStats, or a function building it on first access (see `stats`); a thread that ran no prefill
    # reads the latest of any thread (results read from another thread than the one that generated)
    _stats = PerThread(shared_fallback=True)

    @property
    def uniform_cache(self) -> bool:
        """Whether every decoder layer caches the same tokens (pre-LLM pruning only), so a StaticCache fits."""
        return self.stage == "pre-llm" and not self.schedule

    @property
    def stats(self) -> PruneStats | None:
        """The calling thread's last prefill's `PruneStats` (of any thread if this one ran none), built on
        first access (building reads device memory, so the prefill itself only records how to build it)."""
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats

    @stats.setter
    def stats(self, value: Any) -> None:
        """A `PruneStats`, None, or a zero-argument function returning one (built lazily)."""
        self._stats = value
