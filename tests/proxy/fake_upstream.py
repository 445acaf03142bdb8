"""Moved to `tests.support.fake_upstream`: a re-export until the last importer switches."""

# moved; the importer in tests/ops/test_metrics.py to be updated
from tests.support.fake_upstream import *  # noqa: F403
