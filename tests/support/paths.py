"""Where the checkout and the shared sample data are, for tests at any depth under tests/."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ROOT = (REPO_ROOT.parent / "shared").resolve()
