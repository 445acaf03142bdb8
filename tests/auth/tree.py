"""Moved to `tests.support.tree`: a re-export until the last importer switches."""

# moved; the importer in tests/fuzz/test_fuzz.py to be updated
from tests.support.tree import *  # noqa: F403
