"""`kill -9` of the replica holding docker's upload session while the layer arrives
(issue 14): docker retries a failed layer upload by itself (a new upload, after 5 s),
lands on a survivor, and `docker push` succeeds without help. The store is a shared
folder (test_kill.py covers both stores with HTTP pushers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.replicas.pushing import busiest_upload
from tests.support.dockerd import DockerDaemon
from tests.support.images import make_image, write_docker_archive
from tests.support.replicas import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.clients, pytest.mark.timeout(180)]

MiB = 1024 * 1024


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", count=3) as running:
        yield running


async def test_docker_push_retries_past_a_killed_replica(
    cluster3: Cluster, dockerd: DockerDaemon, tmp_path: Path
) -> None:
    """docker pushes a 48 MiB layer in one PATCH; the replica its session lives on is
    killed while it arrives. docker's own retry (a new upload) completes the push, and
    the image pulls back whole."""
    cluster = cluster3
    img = make_image("replicas-kill-docker", (48 * MiB, 4096))
    local = "regproxy-test/replicas-kill:v1"
    dockerd.docker("load", "--input", write_docker_archive(tmp_path / "image.tar", img, [local]))
    ref = f"{cluster.host}/kill/docker:v1"
    dockerd.docker("tag", local, ref)
    try:
        push = asyncio.create_task(asyncio.to_thread(dockerd.push, ref))
        deadline = time.monotonic() + 60
        while True:
            found = busiest_upload(cluster.replicas)
            if found is not None and found[1] >= 4 * MiB:
                victim = found[0]
                break
            if push.done() or time.monotonic() > deadline:
                await push
                raise AssertionError("the push never had an upload of 4 MiB in progress")
            await asyncio.sleep(0.01)
        # SIGKILL (the process group) from this thread: it started the replica
        victim.kill()
        # the session that was 4 MiB into the layer is gone with its replica: the push
        # can only complete by docker uploading the layer again
        digest, _ = await push
        dockerd.remove_all_images()
        assert f"Digest: {digest}" in dockerd.docker("pull", ref).stdout
        info = dockerd.image_inspect(ref)
        assert info["Id"] == img.image_id
        assert info["RootFS"]["Layers"] == img.diff_ids
    finally:
        dockerd.remove_all_images()
    assert cluster.lb.servers()[victim.replica_name] == "DOWN"
    # docker started more uploads than the image has blobs: the killed one again
    started = [r for r in cluster.lb.requests() if r.request.startswith("POST /v2/kill/docker/")]
    assert len(started) > len(img.blobs()), [(r.server, r.status) for r in started]
