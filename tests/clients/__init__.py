"""End-to-end tests driving real registry clients: skopeo, podman, docker (through a private
dockerd) and ctr (through that dockerd's containerd).

Run against regproxy (default) or, to validate the tests themselves, against Docker's
reference registry::

    python -m pytest tests/clients
    RP_TEST_AGAINST=reference python -m pytest tests/clients

Needs root and the Debian packages skopeo, podman, docker.io and docker-registry. A missing
tool skips locally and fails under ``CI=true``.
"""
