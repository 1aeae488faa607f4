"""Regenerate the "models" column of README.md's method table (`vtprune.support`): every preset tried on a
tiny random model of every adapter. Run after adding a method or an adapter; tests/test_support.py fails
while the column is stale. Usage: ``python scripts/update_readme_models.py`` (about 30 s)."""

from __future__ import annotations

from pathlib import Path

from vtprune.support import support_matrix, with_models_column

README = Path(__file__).resolve().parents[1] / "README.md"

if __name__ == "__main__":
    text = README.read_text()
    new = with_models_column(text, support_matrix())
    README.write_text(new)
    print("README.md: models column " + ("updated" if new != text else "already current"))
