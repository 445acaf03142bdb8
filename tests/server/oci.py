"""Moved to `tests.support.oci`: a re-export until the last importers switch."""

# moved; importers in tests/cli, tests/storage and tests/ops/test_metrics.py to be updated
from tests.support.oci import *  # noqa: F403
