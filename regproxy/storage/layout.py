"""The one map from (name, digest, tag, upload id) to paths inside a store root.

```
<root>/
  blobs/<alg>/<2 hex>/<hex>                      immutable bytes: layers, configs, manifests
  repositories/<name…>/_tags/<tag>               text: digest (mtime = last set / revalidated)
  repositories/<name…>/_manifests/<alg>/<hex>    media type; presence = revision is in the repo
  repositories/<name…>/_layers/<alg>/<hex>       empty; the blob is linked into the repo
  repositories/<name…>/_referrers/<alg>/<subject hex>/<alg>-<hex>
                                                 empty; a manifest whose subject is that digest
  repositories/<name…>/_pulled                   (proxy store) mtime = last pull of the repo
  tmp/                                           the store's own temp files (same filesystem)
  lock                                           advisory lock: commits shared, gc sweep exclusive
```

Names and tags are validated by `reference` before they reach here; a valid
name component never starts with `_` or `.`, and a tag never starts with `.`,
so metadata folders and temp files (`.tmp-*`) cannot collide with them.

Temp files are named here too (`temp_name`: `.tmp-<hex>`, in `tmp/` or wherever a
file is replaced atomically), and `TEMP_MAX_AGE` is the one age after which a temp
or spool file is a crash leftover: start-up, gc and verify all judge by it.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

from regproxy.digest import Digest
from regproxy.reference import validate_name, validate_tag

TAGS = "_tags"
MANIFESTS = "_manifests"
LAYERS = "_layers"
REFERRERS = "_referrers"
PULLED = "_pulled"
REPO_MARKERS = (MANIFESTS, LAYERS, TAGS)
#: every temp file's name starts with it; the dot keeps it out of tag and repository listings
TEMP_PREFIX = ".tmp-"
#: seconds: a temp file (or proxy spool file) older than this is a crash leftover; a younger
#: one may belong to a write in progress (a slow fsync, a big cross-filesystem copy, an
#: offline command such as prefetch writing into the store right now)
TEMP_MAX_AGE = 3600.0
#: paths remembered per method: building a pathlib path costs microseconds, and the same
#: few tags, revisions and blobs are asked for on every request
MEMO_SIZE = 16384


def temp_name(folder: Path, purpose: str = "") -> Path:
    """A fresh temp path in `folder`: `.tmp-<32 hex>`, or `.tmp-<purpose>-<32 hex>`."""
    infix = f"{purpose}-" if purpose else ""
    return Path(folder) / f"{TEMP_PREFIX}{infix}{uuid.uuid4().hex}"


def is_temp(name: str) -> bool:
    """Whether a file name is one `temp_name` makes."""
    return name.startswith(TEMP_PREFIX)


class Layout:
    """Paths of one store; every method validates its inputs again (defence in depth)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.repositories = self.root / "repositories"
        self.tmp = self.root / "tmp"
        self.lock = self.root / "lock"

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def repo(self, name: str) -> Path:
        return self.repositories / validate_name(name)

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def tags_dir(self, name: str) -> Path:
        return self.repo(name) / TAGS

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def tag(self, name: str, tag: str) -> Path:
        return self.tags_dir(name) / validate_tag(tag)

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def revisions_dir(self, name: str) -> Path:
        return self.repo(name) / MANIFESTS

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def revision(self, name: str, digest: Digest) -> Path:
        return self.revisions_dir(name) / digest.algorithm / digest.hex

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def layer(self, name: str, digest: Digest) -> Path:
        return self.repo(name) / LAYERS / digest.algorithm / digest.hex

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def referrers_dir(self, name: str, subject: Digest) -> Path:
        return self.repo(name) / REFERRERS / subject.algorithm / subject.hex

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def referrer(self, name: str, subject: Digest, referrer: Digest) -> Path:
        return self.referrers_dir(name, subject) / f"{referrer.algorithm}-{referrer.hex}"

    @functools.lru_cache(maxsize=MEMO_SIZE)  # noqa: B019 - layouts live as long as the process
    def pulled(self, name: str) -> Path:
        return self.repo(name) / PULLED
