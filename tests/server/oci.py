"""Moved to `tests.support.oci`: a re-export until the last importers switch."""

# moved; importers in tests/cli and tests/server/test_{body_rate,upload_limits}.py to be updated
from tests.support.oci import *  # noqa: F403
