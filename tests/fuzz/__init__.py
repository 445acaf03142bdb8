"""Seeded fuzzing of every route, mode and the raw HTTP layer (issue 11, hardening)."""
