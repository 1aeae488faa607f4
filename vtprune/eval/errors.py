"""`EvalError`: bad input to `vtprune eval` (task file, image, model name); the message names the fix."""

from __future__ import annotations


class EvalError(ValueError):
    """An evaluation cannot start: a missing image, a malformed task line, an unknown task or model.

    ``vtprune eval`` prints it as ``vtprune: error: ...`` and exits with status 2.
    """
