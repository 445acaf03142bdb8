"""Moved to `tests.support.auth`: a re-export until the last importers switch."""

# moved; importers in tests/auth/test_{revocation,signin_limits,target_matrix}.py to be updated
from tests.support.auth import *  # noqa: F403
