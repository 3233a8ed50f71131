"""Where the tests find the repository, its committed fixtures and the shared datasets beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"  # ships beside the repository in CI, read-only
