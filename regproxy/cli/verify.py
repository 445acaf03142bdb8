"""`regproxy verify`: re-hash everything, check references and look for leftovers.

Each problem is reported with its path and what is wrong; exit 1 if there is
any (also after `--repair`: run verify again to confirm a clean state). What
`--repair` does is in `storage.verify`: it never deletes pushed data.

`--json` prints:

    {"ok": bool, "repair": bool, "workers": int, "blobs_hashed": int, "bytes_hashed": int,
     "hash_seconds": float, "throughput": int (bytes/s), "seconds": float,
     "stores": [{"store", "root", "blobs", "bytes", "repositories", "manifests", "tags",
                 "seconds"}],
     "problems": [{"store", "kind", "path", "message", "digest", "repair", "needed_by": [ref…]}]}
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.text import Text

from regproxy.cli import EXIT_PROBLEMS, config_option, load_config
from regproxy.cli.render import (
    byte_progress,
    check_writable_store,
    cli_errors,
    console,
    emit_json,
    human_seconds,
    human_size,
    json_option,
    open_store,
)
from regproxy.storage import verify as verify_mod
from regproxy.storage.runs import record_run


class _Bar:
    """Adapts `storage.verify.Progress` to one rich task (rich's `advance` is thread-safe)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def start(self, total_bytes: int, total_files: int) -> None:
        self.task = self.progress.add_task(f"hashing {total_files} blobs", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, nbytes)


@click.command()
@config_option
@click.option(
    "--repair",
    is_flag=True,
    help="Remove corrupt cached blobs, quarantine corrupt pushed ones, fix links, "
    "remove stray temp files.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=None,
    help="Hashing threads (default: one per core, 2 to 8).",
)
@json_option
def verify(config_path: Path | None, repair: bool, jobs: int | None, as_json: bool) -> None:
    """Re-hash every blob and manifest; check tags, manifests, links and temp files."""
    config = load_config(config_path)
    targets = []
    with cli_errors():
        for label, root, cached in (
            ("registry", config.registry_storage, False),
            ("proxy", config.proxy_storage, True),
        ):
            if repair:
                check_writable_store(root)
            store = open_store(root, config.s3, create=False)
            if store is not None:
                targets.append(verify_mod.Target(label, store, cached))
        out = console()
        with byte_progress(out, out.is_terminal and not as_json, transient=True) as progress:
            report = verify_mod.verify(
                targets,
                config.temporary_registry_storage,
                config.server.upload_max_age,
                repair=repair,
                workers=jobs,
                progress=_Bar(progress),
            )
    record_run(config.temporary_registry_storage, "verify", report.ok, report.seconds)
    if as_json:
        emit_json(report.to_json())
    else:
        _render(out, report)
    if not report.ok:
        raise SystemExit(EXIT_PROBLEMS)


def _render(out: Console, report: verify_mod.VerifyReport) -> None:
    """One block per problem, never truncated: paths must stay copy-pastable."""
    for p in report.problems:
        head = Text()
        head.append(f"{p.store} {p.kind}", style="bold red")
        head.append(f" {p.path}")
        out.print(head, soft_wrap=True)
        out.print(Text(f"    {p.message}"), soft_wrap=True)
        if p.needed_by:
            out.print(Text(f"    needed by: {', '.join(p.needed_by)}"), soft_wrap=True)
        if report.repair:
            out.print(Text(f"    repair: {p.repair or 'not repaired'}"), soft_wrap=True)
    speed = human_size(int(report.throughput))
    out.print(
        f"hashed {report.blobs_hashed} blobs, {human_size(report.bytes_hashed)} in "
        f"{human_seconds(report.hash_seconds)} ({speed}/s, {report.workers} threads); "
        + ("no problems" if report.ok else f"{len(report.problems)} problem(s)"),
        soft_wrap=True,
    )
