"""`regproxy ls [NAME-PREFIX]`: what is stored, how big it is, and how fresh.

One row per repository (pushed ones by their name, cached ones as
`p/<upstream>/<name>`, the name a client pulls), or with `--tags` one row per
tag (untagged manifests show as `<none>`). Sizes count each blob once per
repository; *unique* bytes are needed by no other repository of the same
store, *shared* bytes are. Exit 1 when a NAME-PREFIX matches nothing.

`--json` prints:

    {"stores": [{"kind": "local" | "proxy", "root", "repositories", "blobs", "bytes"}],
     "repositories": [{"name", "kind", "upstream", "remote", "size", "unique_size",
                       "shared_size", "updated", "last_pulled", "last_revalidated",
                       "tags": [{"tag", "digest", "updated", "media_type", "platforms", "size"}],
                       "manifests": [{"digest", "media_type", "artifact_type", "platforms",
                                      "size", "tags", "pushed", "complete",
                                      "children": [digest…]}]}]}

Sizes are bytes; times are ISO 8601 UTC or null.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from regproxy import manifest as mf
from regproxy.cli import EXIT_PROBLEMS, config_option, fail, load_config
from regproxy.cli.render import (
    add_row,
    cli_errors,
    console,
    emit_json,
    human_age,
    human_size,
    iso,
    json_option,
    open_store,
    short_digest,
    table,
)
from regproxy.storage.inventory import (
    LOCAL,
    PROXY,
    Inventory,
    ManifestInfo,
    RepositoryInfo,
    inventory,
)

NO_TAG = "<none>"
_SHORT_TYPES = {
    mf.OCI_INDEX: "oci index",
    mf.OCI_MANIFEST: "oci image",
    mf.DOCKER_MANIFEST_LIST: "docker list",
    mf.DOCKER_MANIFEST: "docker image",
}


def _kind_label(repo: RepositoryInfo) -> str:
    return "local" if repo.kind == LOCAL else f"proxy:{repo.upstream}"


def _type_label(m: ManifestInfo | None) -> str:
    if m is None:
        return "?"
    label = _SHORT_TYPES.get(m.media_type or "", m.media_type or "?")
    return f"{label} ({m.artifact_type})" if m.artifact_type else label


@click.command(name="ls")
@config_option
@click.argument("name_prefix", required=False, metavar="[NAME-PREFIX]")
@click.option("--local", "only_local", is_flag=True, help="Only pushed repositories.")
@click.option("--proxy", "only_proxy", is_flag=True, help="Only cached (proxied) repositories.")
@click.option("--tags", "show_tags", is_flag=True, help="One row per tag, not per repository.")
@click.option(
    "--sort",
    type=click.Choice(["name", "size", "age"]),
    default="name",
    show_default=True,
    help="size: largest first; age: most recently updated first.",
)
@json_option
def ls(
    config_path: Path | None,
    name_prefix: str | None,
    only_local: bool,
    only_proxy: bool,
    show_tags: bool,
    sort: str,
    as_json: bool,
) -> None:
    """List repositories, tags, digests, platforms and sizes (pushed and cached)."""
    if only_local and only_proxy:
        fail("--local and --proxy exclude each other (give neither to list both)")
    config = load_config(config_path)
    stores = []
    if not only_proxy:
        stores.append((LOCAL, config.registry_storage))
    if not only_local:
        stores.append((PROXY, config.proxy_storage))
    with cli_errors():
        opened = [(kind, open_store(root, config.s3, create=False)) for kind, root in stores]
        found = inventory(
            [(kind, store) for kind, store in opened if store is not None],
            name_prefix,
            config.proxy.prefix,
        )
    _sort(found, sort)
    if as_json:
        emit_json(_to_json(found))
    elif show_tags:
        console().print(_tags_table(found))
    else:
        _print_repositories(found)
    if name_prefix and not found.repositories:
        click.echo(f"regproxy: no repository matches {name_prefix!r}", err=True)
        raise SystemExit(EXIT_PROBLEMS)


def _sort(found: Inventory, key: str) -> None:
    repos = found.repositories
    if key == "size":
        repos.sort(key=lambda r: (-r.size, r.name))
    elif key == "age":
        repos.sort(key=lambda r: (-(r.updated or 0.0), r.name))
    else:
        repos.sort(key=lambda r: r.name)


def _print_repositories(found: Inventory) -> None:
    t = table(
        None,
        [
            "repository",
            "kind",
            ("tags", "right"),
            ("manifests", "right"),
            ("size", "right"),
            ("unique", "right"),
            ("shared", "right"),
            "updated",
            "last pulled",
            "revalidated",
        ],
    )
    for r in found.repositories:
        add_row(
            t,
            r.name,
            _kind_label(r),
            str(len(r.tags)),
            str(len(r.manifests)),
            human_size(r.size),
            human_size(r.unique_size),
            human_size(r.shared_size),
            human_age(r.updated),
            human_age(r.last_pulled) if r.kind == PROXY else "-",
            human_age(r.last_revalidated) if r.kind == PROXY else "-",
        )
    out = console()
    out.print(t)
    for s in found.stores:
        out.print(
            f"{s.kind}: {s.repositories} repositories, {s.blobs} blobs, "
            f"{human_size(s.bytes)} in {s.root}",
            markup=False,
        )


def _tag_rows(repo: RepositoryInfo) -> list[tuple[str, ManifestInfo | None, float | None]]:
    """(tag, its manifest, updated) per tag, each index followed by its children
    (`  └ <tag>`), then `<none>` for the other untagged manifests."""
    manifests = {m.digest: m for m in repo.manifests}
    rows: list[tuple[str, ManifestInfo | None, float | None]] = []
    shown: set[str] = set()
    for t in repo.tags:
        m = manifests.get(t.digest)
        rows.append((t.tag, m, t.updated))
        for child in m.children if m else []:
            if child in manifests and not manifests[child].tags:
                rows.append((f"  └ {t.tag}", manifests[child], manifests[child].pushed))
                shown.add(child)
    rows += [(NO_TAG, m, m.pushed) for m in repo.manifests if not (m.tags or m.digest in shown)]
    return rows


def _tags_table(found: Inventory) -> Table:
    t = table(
        None,
        [
            "repository",
            "tag",
            "digest",
            "type",
            "platforms",
            ("size", "right"),
            "updated",
        ],
    )
    for repo in found.repositories:
        for tag, m, updated in _tag_rows(repo):
            digest = m.digest if m else next((x.digest for x in repo.tags if x.tag == tag), None)
            size = human_size(m.size) if m else "-"
            if m is not None and not m.complete:
                size += " (partial)"
            add_row(
                t,
                repo.name,
                tag,
                short_digest(digest),
                _type_label(m),
                ", ".join(m.platforms) if m else "",
                size,
                human_age(updated),
            )
    return t


def _to_json(found: Inventory) -> dict:
    def manifest_json(m: ManifestInfo) -> dict:
        return {
            "digest": m.digest,
            "media_type": m.media_type,
            "artifact_type": m.artifact_type,
            "platforms": m.platforms,
            "size": m.size,
            "tags": m.tags,
            "pushed": iso(m.pushed),
            "complete": m.complete,
            "children": m.children,
        }

    def repo_json(r: RepositoryInfo) -> dict:
        manifests = {m.digest: m for m in r.manifests}
        return {
            "name": r.name,
            "kind": r.kind,
            "upstream": r.upstream,
            "remote": r.remote,
            "size": r.size,
            "unique_size": r.unique_size,
            "shared_size": r.shared_size,
            "updated": iso(r.updated),
            "last_pulled": iso(r.last_pulled),
            "last_revalidated": iso(r.last_revalidated),
            "tags": [
                {
                    "tag": t.tag,
                    "digest": t.digest,
                    "updated": iso(t.updated),
                    "media_type": manifests[t.digest].media_type if t.digest in manifests else None,
                    "platforms": manifests[t.digest].platforms if t.digest in manifests else [],
                    "size": manifests[t.digest].size if t.digest in manifests else None,
                }
                for t in r.tags
            ],
            "manifests": [manifest_json(m) for m in r.manifests],
        }

    return {
        "stores": [
            {
                "kind": s.kind,
                "root": s.root,
                "repositories": s.repositories,
                "blobs": s.blobs,
                "bytes": s.bytes,
            }
            for s in found.stores
        ],
        "repositories": [repo_json(r) for r in found.repositories],
    }
