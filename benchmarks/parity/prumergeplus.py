"""Parity of vtprune's ``prumerge+`` with PruMerge+ in LLaVA-PruMerge's released code
(github.com/42Shawn/LLaVA-PruMerge, ``CLIPVisionTower.token_prune_merge_advanced_plus`` in
``llava/model/multimodal_encoder/clip_encoder.py``, the function the release's ``forward`` calls).

PruMerge's outliers plus the release's spatially uniform samples (``arange(0, 575, int(int(1 / ratio) /
3))`` minus the outliers), all merged with their 32 nearest tokens by key cosine, and the extra token.
The comparison (kept sets, merged feature rows, budgets, the tiny 24-layer tower, the stand-in ``self``)
is `prumerge`'s (see ``benchmarks/parity/prumerge.py``); ``release_count`` in a row is the release's
outliers and samples, ``release_outliers`` the outliers alone.

    python benchmarks/parity/prumergeplus.py --ref /path/to/LLaVA-PruMerge
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name  # noqa: E402
from prumerge import FEATURE_TOLERANCE, compare_method, run  # noqa: E402, F401

METHOD = "prumerge+"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4  # unused: no logits are compared (see prumerge.py)


def compare(ref: Path) -> list[dict[str, Any]]:
    return compare_method(ref, METHOD)


def main(argv: list[str] | None = None) -> int:
    return run(METHOD, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
