"""The runtime: hooks that thread one prefill's plan through the model (`install`), in stages.

- `hooks`: the core's pre-hook (one host read per prefill, the layout, decode steps), encoder wrappers.
- `pre_llm`: shortening before the LLM; `llm_stages`: dropping after decoder layers, decode masks.
- `stages`: `MethodStage`, the one interface through which a method adds runtime work; VisionZip's
  (`visionzip`) and FlowCut's (`flowcut`) register there.
- `cache`: which KV caches fit; `llava_repo`: the original LLaVA codebase's runtime.
"""

from vtprune.runtime import flowcut, llava_repo, prumerge, visionzip  # noqa: F401  (registration)
from vtprune.runtime.cache import check_cache
from vtprune.runtime.hooks import Runtime, install, register_runtime
from vtprune.runtime.stages import MethodStage, register_stage, stage_for

__all__ = ["MethodStage", "Runtime", "check_cache", "install", "register_runtime", "register_stage", "stage_for"]
