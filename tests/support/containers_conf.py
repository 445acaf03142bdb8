"""Private configuration for the containers/image tools (podman, skopeo).

Both read /etc/containers and ~/.config by default: registry mirrors, short-name aliases,
signature policies or stored credentials there would change what a test does. Tests
point them at files written here instead, via the documented environment variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REGISTRIES_CONF = """\
# Written by the regproxy test suite: no search registries, no mirrors, so every
# reference a test uses is fully qualified and goes exactly where it says.
unqualified-search-registries = []
short-name-mode = "disabled"
"""

POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


@dataclass(frozen=True)
class ContainersConfig:
    """Paths of the private config; ``env`` makes podman and skopeo use them."""

    env: dict[str, str]
    policy: Path


def write_containers_config(directory: Path) -> ContainersConfig:
    """Write registries.conf, policy.json and an empty auth file into ``directory``.

    The policy has no environment variable in these releases: pass ``policy`` with
    skopeo's ``--policy`` or podman's (hidden) ``--signature-policy``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    registries = directory / "registries.conf"
    registries.write_text(REGISTRIES_CONF)
    policy = directory / "policy.json"
    policy.write_text(json.dumps(POLICY))
    auth = directory / "auth.json"
    auth.write_text("{}")
    tmp = directory / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "REGISTRY_AUTH_FILE": str(auth),
        # Big temporary files (layer uploads, archive extraction) go here, not /var/tmp.
        "TMPDIR": str(tmp),
    }
    return ContainersConfig(env=env, policy=policy)
