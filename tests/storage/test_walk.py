"""`manifest.walk`: the one walk of a manifest's references that gc, inventory and verify use."""

from __future__ import annotations

from regproxy import manifest as mf
from regproxy.digest import Digest
from tests.support.oci import Image, make_artifact, make_image, make_index


def _parsed(images: list[Image], *indexes: tuple[bytes, str]) -> dict[Digest, mf.Manifest]:
    found = {Digest.parse(i.digest): mf.parse(i.manifest, i.media_type) for i in images}
    for data, digest in indexes:
        found[Digest.parse(digest)] = mf.parse(data)
    return found


def test_an_index_yields_itself_and_each_child_once() -> None:
    a, b = make_image(), make_image()
    index = make_index([a, b, a])  # a listed twice: still walked once
    docs = _parsed([a, b], index)
    top = Digest.parse(index[1])
    walked = list(mf.walk(top, docs.get))
    assert [d for d, _ in walked].count(Digest.parse(a.digest)) == 1
    assert {d for d, _ in walked} == {top, Digest.parse(a.digest), Digest.parse(b.digest)}
    assert all(m is docs[d] for d, m in walked)


def test_a_missing_manifest_is_a_leaf() -> None:
    a, b = make_image(), make_image()
    index = make_index([a, b])
    docs = _parsed([a], index)  # b is not there (a partial cache)
    walked = dict(mf.walk(Digest.parse(index[1]), docs.get))
    assert walked[Digest.parse(b.digest)] is None
    assert walked[Digest.parse(a.digest)] is docs[Digest.parse(a.digest)]


def test_seen_carries_across_walks_and_also_adds_edges() -> None:
    """gc's use: many roots in one repository, and referrers kept with their subject."""
    subject = make_image()
    signature = make_artifact("application/vnd.example.sig", subject=subject)
    docs = _parsed([subject, signature])
    root, sig = Digest.parse(subject.digest), Digest.parse(signature.digest)
    referrers = {root: [sig]}
    seen: set[Digest] = set()
    first = [d for d, _ in mf.walk(root, docs.get, seen, lambda d: referrers.get(d, []))]
    assert first == [root, sig]
    assert list(mf.walk(sig, docs.get, seen)) == []  # already walked from the first root
    assert seen == {root, sig}
