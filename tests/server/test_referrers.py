"""The referrers API: an OCI index of manifests whose `subject` is a digest."""

from __future__ import annotations

import json

from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.support.digests import sha256
from tests.support.oci import (
    assert_error,
    list_referrers,
    make_artifact,
    make_image,
    make_index,
    push_image,
    put_manifest,
)

SIG = "application/vnd.example.signature.v1"
SBOM = "application/vnd.example.sbom.v1+json"


async def test_empty_when_none(client: TestClient) -> None:
    """No referrers (or no repository at all) is an empty index, not a 404."""
    image = make_image()
    await push_image(client, "lonely", image, "v1")
    for name, digest in (("lonely", image.digest), ("nosuchrepo", sha256(b"x"))):
        body = await list_referrers(client, name, digest)
        assert body["manifests"] == []


async def test_listing(client: TestClient) -> None:
    subject = make_image()
    await push_image(client, "withrefs", subject, "v1")
    sig = make_artifact(SIG, subject=subject, annotations={"org.example.signer": "alice"})
    sbom = make_artifact(SBOM, subject=subject)
    unrelated = make_artifact(SIG)
    for artifact in (sig, sbom, unrelated):
        resp_digest = await push_image(client, "withrefs", artifact, artifact.digest)
        assert resp_digest == artifact.digest
    body = await list_referrers(client, "withrefs", subject.digest)
    found = {m["digest"]: m for m in body["manifests"]}
    assert set(found) == {sig.digest, sbom.digest}
    assert found[sig.digest] == {
        "mediaType": mf.OCI_MANIFEST,
        "digest": sig.digest,
        "size": len(sig.manifest),
        "artifactType": SIG,
        "annotations": {"org.example.signer": "alice"},
    }
    assert found[sbom.digest]["artifactType"] == SBOM
    assert found[sbom.digest]["size"] == len(sbom.manifest)
    # referrers are per repository
    body = await list_referrers(client, "elsewhere", subject.digest)
    assert body["manifests"] == []


async def test_config_media_type_is_artifact_type(client: TestClient) -> None:
    """Without `artifactType`, the config's media type is the one listed."""
    subject = make_image()
    await push_image(client, "cfgtype", subject, "v1")
    referrer = make_image(
        subject={
            "mediaType": mf.OCI_MANIFEST,
            "digest": subject.digest,
            "size": len(subject.manifest),
        }
    )
    await push_image(client, "cfgtype", referrer, "ref")
    body = await list_referrers(client, "cfgtype", subject.digest)
    assert [m["artifactType"] for m in body["manifests"]] == [
        "application/vnd.oci.image.config.v1+json"
    ]


async def test_artifact_type_filter(client: TestClient) -> None:
    subject = make_image()
    await push_image(client, "filtered", subject, "v1")
    sigs = [make_artifact(SIG, subject=subject) for _ in range(2)]
    sbom = make_artifact(SBOM, subject=subject)
    for artifact in (*sigs, sbom):
        await push_image(client, "filtered", artifact, artifact.digest)
    resp = await client.get(f"/v2/filtered/referrers/{subject.digest}?artifactType={SIG}")
    assert resp.status == 200
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    body = await resp.json(content_type=None)
    assert {m["digest"] for m in body["manifests"]} == {a.digest for a in sigs}
    resp = await client.get(f"/v2/filtered/referrers/{subject.digest}?artifactType=nope/none")
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert (await resp.json(content_type=None))["manifests"] == []
    resp = await client.get(f"/v2/filtered/referrers/{subject.digest}")
    assert "OCI-Filters-Applied" not in resp.headers
    assert len((await resp.json(content_type=None))["manifests"]) == 3


async def test_index_as_referrer(client: TestClient) -> None:
    """An index can have a subject too, and is listed with its own media type."""
    subject = make_image()
    child = make_image()
    await push_image(client, "idxref", subject, "v1")
    await push_image(client, "idxref", child, "child")
    data, digest = make_index([child])
    doc = json.loads(data)
    doc["subject"] = {
        "mediaType": mf.OCI_MANIFEST,
        "digest": subject.digest,
        "size": len(subject.manifest),
    }
    doc["artifactType"] = SBOM
    data = json.dumps(doc).encode()
    resp = await put_manifest(client, "idxref", "idx", data, mf.OCI_INDEX)
    assert resp.status == 201
    assert resp.headers["OCI-Subject"] == subject.digest
    body = await list_referrers(client, "idxref", subject.digest)
    assert body["manifests"] == [
        {"mediaType": mf.OCI_INDEX, "digest": sha256(data), "size": len(data), "artifactType": SBOM}
    ]
    assert digest != sha256(data)


async def test_referrer_pushed_by_tag_and_retagged(client: TestClient) -> None:
    """Moving a tag away from a referrer does not unlist it (the revision remains)."""
    subject = make_image()
    await push_image(client, "retagref", subject, "v1")
    sig = make_artifact(SIG, subject=subject)
    await push_image(client, "retagref", sig, "sig")
    await push_image(client, "retagref", make_image(), "sig")
    body = await list_referrers(client, "retagref", subject.digest)
    assert [m["digest"] for m in body["manifests"]] == [sig.digest]


async def test_bad_digest(client: TestClient) -> None:
    for bad in ("sha256:abc", "latest", "md5:" + "0" * 32):
        resp = await client.get(f"/v2/x/referrers/{bad}")
        await assert_error(resp, 400, "DIGEST_INVALID")
