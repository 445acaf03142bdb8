"""Shared helpers for tests that drive real registry clients and real registry servers.

Nothing in here talks to the network beyond 127.0.0.1: images are generated in pure Python
and every server is started on a loopback port.
"""
