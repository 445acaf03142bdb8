"""Blob uploads: POST (session, monolithic, mount), PATCH, PUT, GET status, DELETE."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator

from aiohttp import web

from regproxy.digest import Digest
from regproxy.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    NameInvalid,
    RangeNotSatisfiable,
    SizeInvalid,
)
from regproxy.reference import validate_name
from regproxy.server.bodies import parse_content_range, pieces, take_body
from regproxy.server.forward import FORWARDER, forwarded
from regproxy.server.keys import CONFIG, MAY, OFFLOAD, REGISTRY, REPLICAS, UPLOADS, USER
from regproxy.server.names import local_name_for_write
from regproxy.server.peer import client_address
from regproxy.sockbody import BodyTimeout
from regproxy.storage.intake import take_in, take_in_direct
from regproxy.storage.replicas import owner_of
from regproxy.storage.uploads import UploadSession

#: One request at a time per session: an asyncio lock per live session id.
SESSION_LOCKS = web.AppKey("upload_locks", weakref.WeakValueDictionary)
#: seconds between tries of a PUT waiting for another process's request on its session
SHARED_LOCK_POLL = 0.02


def _session_lock(request: web.Request, upload_id: str) -> asyncio.Lock:
    locks = request.app[SESSION_LOCKS]
    lock = locks.get(upload_id)
    if lock is None:
        lock = locks[upload_id] = asyncio.Lock()
    return lock


@contextlib.asynccontextmanager
async def _across_processes(
    request: web.Request, session: UploadSession, wait: bool, catch_up: bool = True
) -> AsyncIterator[None]:
    """With several workers: hold the session's lock file for the request (a PATCH finding
    it held fails like one finding the in-process lock held; a PUT waits), and take in what
    other workers appended (`Uploads.acquire`). A PATCH leaves the digest so far behind."""
    uploads = request.app[UPLOADS]
    if not uploads.shared:
        yield
        return
    offload = request.app[OFFLOAD]
    while (fd := await offload.run(uploads.acquire, session, catch_up)) is None:
        if not wait:
            raise BlobUploadInvalid("another request is writing to this upload")
        await asyncio.sleep(SHARED_LOCK_POLL)
    try:
        yield
    finally:
        release = offload.run(uploads.release, session, fd, not wait)
        await asyncio.shield(release)


def _progress_headers(session: UploadSession, offset: int | None = None) -> dict[str, str]:
    end = max((session.offset if offset is None else offset) - 1, 0)
    return {
        "Location": f"/v2/{session.name}/blobs/uploads/{session.id}",
        "Range": f"0-{end}",
        "Docker-Upload-UUID": session.id,
        "Blob-Upload-Session-ID": session.id,
    }


def _created(name: str, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest)},
    )


def _digest_param(request: web.Request) -> Digest:
    values = request.query.getall("digest", [])
    if not values:
        raise DigestInvalid("the digest query parameter is required to finish an upload")
    return Digest.parse(values[0])


async def _receive(request: web.Request, session: UploadSession) -> int:
    """Stream the body into the session (`storage.intake`): straight from the socket on
    threads when it is large (`take_body`), else as aiohttp reads it."""
    uploads = request.app[UPLOADS]
    offload = request.app[OFFLOAD]
    sink = uploads.sink(session)
    taken = take_body(request)
    if taken is None:
        return await take_in(pieces(request), sink, offload)
    server = request.app[CONFIG].server
    try:
        # cancelled (shutdown): the pump stops on its own; the caller may drop the
        # session meanwhile, as its writer keeps its own descriptors
        return await take_in_direct(
            taken,
            sink,
            offload,
            timeout=server.body_timeout,
            min_rate=server.body_min_rate,
            position=session.offset,
            wait_when_cancelled=False,
        )
    except BodyTimeout as exc:  # BodyTooSlow included
        raise BlobUploadInvalid(str(exc)) from None


async def _receive_chunk(request: web.Request, session: UploadSession) -> None:
    """A PATCH or final PUT body, checked against Content-Range/Content-Length when given."""
    header = request.headers.get("Content-Range")
    expected = None
    if header is not None:
        try:
            start, end = parse_content_range(header, session.offset)
        except RangeNotSatisfiable as exc:
            exc.headers.update(_progress_headers(session))
            raise
        expected = end - start + 1
        if request.content_length is not None and request.content_length != expected:
            raise SizeInvalid("Content-Length does not match Content-Range")
    start_offset = session.offset
    received = await _receive(request, session)
    if expected is not None and received != expected:
        # the chunk is rejected whole: the session goes back to where it was
        await request.app[OFFLOAD].run(request.app[UPLOADS].rewind, session, start_offset)
        raise SizeInvalid(f"received {received} bytes, Content-Range announced {expected}")


async def _held_elsewhere(request: web.Request) -> web.StreamResponse | None:
    """A session another replica holds (its id names it): relay the request there and
    return the answer; None when the session is this host's (or nobody's)."""
    upload_id = request.match_info["upload_id"]
    replicas = request.app[REPLICAS]
    owner_id = owner_of(upload_id)
    if owner_id == replicas.own.id or len(upload_id) != 32 or forwarded(request):
        return None
    owner = await request.app[OFFLOAD].run(replicas.find, owner_id)
    if owner is None or owner.url is None:
        return None  # an id from before replicas, or made up: unknown here
    response = await request.app[FORWARDER].relay(request, owner)
    if response is None:  # its replica is gone, and the session with it
        replicas.forget(owner_id)
        raise BlobUploadUnknown(
            f"the replica holding this upload ({owner.name}) cannot be reached: "
            "start the upload again",
            detail={"uuid": upload_id[:100]},
        )
    return response


def _owner(request: web.Request) -> str | None:
    """Who an upload session belongs to: the user; without auth, nobody in particular."""
    return request.get(USER)


async def start_upload(request: web.Request) -> web.Response:
    name = await local_name_for_write(request)
    store = request.app[REGISTRY]
    offload = request.app[OFFLOAD]
    mount = request.query.get("mount")
    source = request.query.get("from")
    if mount is not None and source:
        digest = Digest.parse(mount)
        try:
            validate_name(source)
        except NameInvalid:
            source = None
        may = request.get(MAY)
        if source and may is not None and not may("pull", source):
            source = None  # never mount from a repository the caller cannot read
        if source:
            mounted: bool = await offload.run(store.mount_blob, name, digest, source)
            if mounted:
                return _created(name, digest)
        # not mountable (or no access): fall back to a normal upload, as the spec says
    if "digest" in request.query:
        _digest_param(request)  # a malformed digest must not leave a session behind
    owner = _owner(request)
    client = owner or client_address(request)  # behind a trusted proxy: the forwarded one
    uploads = request.app[UPLOADS]
    server = request.app[CONFIG].server
    per_client, total = server.max_uploads_per_client, server.max_upload_sessions
    uploads.check_room(client, per_client, total)  # refused without a thread hop when full
    session = await offload.run(
        uploads.create, name, owner, client, max_per_client=per_client, max_total=total
    )
    if "digest" in request.query:
        return await _finish(request, session, monolithic=True)
    return web.Response(status=202, headers=_progress_headers(session))


async def _abort(request: web.Request, session: UploadSession) -> None:
    """A body cut off by a server shutdown: drop the session and its temp file."""
    await asyncio.shield(request.app[OFFLOAD].run(request.app[UPLOADS].cancel, session))


async def _finish(request: web.Request, session: UploadSession, monolithic: bool) -> web.Response:
    digest = _digest_param(request)
    uploads = request.app[UPLOADS]
    offload = request.app[OFFLOAD]
    # a PUT without a body need not bring the running hash up to date: `finish` sees to it
    catch_up = request.body_exists or "Content-Range" in request.headers
    async with _session_lock(request, session.id):
        # a request that waited for the lock may find the session finished or cancelled
        session = uploads.get(session.name, session.id, session.owner)
        async with _across_processes(request, session, wait=True, catch_up=catch_up):
            with uploads.using(session):  # not purged while it receives or commits
                try:
                    await _receive_chunk(request, session)
                except asyncio.CancelledError:
                    await _abort(request, session)
                    raise
                except BaseException:
                    if monolithic:
                        await offload.run(uploads.cancel, session)
                    raise
                await offload.run(uploads.finish, session, digest, request.app[REGISTRY])
    return _created(session.name, digest)


async def patch_upload(request: web.Request) -> web.StreamResponse:
    name = await local_name_for_write(request)
    if (relayed := await _held_elsewhere(request)) is not None:
        return relayed
    session = request.app[UPLOADS].get(name, request.match_info["upload_id"], _owner(request))
    lock = _session_lock(request, session.id)
    if lock.locked():
        raise BlobUploadInvalid("another request is writing to this upload")
    async with lock, _across_processes(request, session, wait=False):
        with request.app[UPLOADS].using(session):  # not purged mid-body
            try:
                await _receive_chunk(request, session)
            except asyncio.CancelledError:
                await _abort(request, session)
                raise
    return web.Response(status=202, headers=_progress_headers(session))


async def put_upload(request: web.Request) -> web.StreamResponse:
    name = await local_name_for_write(request)
    if (relayed := await _held_elsewhere(request)) is not None:
        return relayed
    session = request.app[UPLOADS].get(name, request.match_info["upload_id"], _owner(request))
    return await _finish(request, session, monolithic=False)


async def upload_status(request: web.Request) -> web.StreamResponse:
    name = await local_name_for_write(request)
    if (relayed := await _held_elsewhere(request)) is not None:
        return relayed
    uploads = request.app[UPLOADS]
    session = uploads.get(name, request.match_info["upload_id"], _owner(request))
    # with several workers, another one may be appending: the size on disk is the truth
    offset = uploads.offset_on_disk(session)
    return web.Response(status=204, headers=_progress_headers(session, offset))


async def cancel_upload(request: web.Request) -> web.StreamResponse:
    name = await local_name_for_write(request)
    if (relayed := await _held_elsewhere(request)) is not None:
        return relayed
    uploads = request.app[UPLOADS]
    session = uploads.get(name, request.match_info["upload_id"], _owner(request))
    await request.app[OFFLOAD].run(uploads.cancel, session)
    return web.Response(status=204)
