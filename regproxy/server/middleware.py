"""Render every error as the OCI JSON envelope; add the API version header."""

from __future__ import annotations

import errno
import json
import logging

from aiohttp import web

from regproxy.errors import (
    BodyEncodingUnsupported,
    NameUnknown,
    PayloadTooLarge,
    RegistryError,
    StorageFull,
    Unsupported,
    object_store_error,
)
from regproxy.server.keys import CLOSE_AFTER

log = logging.getLogger("regproxy.server")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


def error_response(error: RegistryError, method: str = "GET") -> web.Response:
    headers = {**API_VERSION_HEADER, **error.headers}
    encoded = json.dumps(error.envelope()).encode()
    if method == "HEAD":
        # aiohttp's content_length setter raises on web.Response: set the header itself
        headers["Content-Length"] = str(len(encoded))
    body = None if method == "HEAD" else encoded
    return web.Response(
        status=error.status, body=body, content_type="application/json", headers=headers
    )


def _from_http(exc: web.HTTPException) -> RegistryError | None:
    if exc.status == 404:
        return NameUnknown("unknown endpoint")
    if exc.status == 405:
        return Unsupported("method not allowed on this endpoint")
    if exc.status == 413:
        return PayloadTooLarge()
    return None


def _encoded_body(request: web.Request) -> bool:
    coding = request.headers.get("Content-Encoding")
    return coding is not None and coding.strip().lower() not in ("", "identity")


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    if request.method in _BODY_METHODS and _encoded_body(request):
        # refused before a byte is read; the unread body rules out keeping the connection
        refused = error_response(BodyEncodingUnsupported(), request.method)
        refused.force_close()
        return refused
    response = await _answer(request, handler)
    # the body was read past aiohttp's parser (bodies.take_body); GET and HEAD never are,
    # and skip the lookup (a KeyError inside Mapping.get) on the hot path
    if request.method in _BODY_METHODS and request.get(CLOSE_AFTER):
        response.force_close()
    return response


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as exc:
        return error_response(exc, request.method)
    except web.HTTPException as exc:
        mapped = _from_http(exc)
        if mapped is None:
            raise
        return error_response(mapped, request.method)
    except ConnectionResetError:
        raise  # the client went away; nothing to answer
    except OSError as exc:
        stored = _object_store_failure(request, exc)  # some of botocore's are OSErrors
        if stored is not None:
            return stored
        if exc.errno == errno.ENOSPC:
            log.error("storage full on %s %s", request.method, request.path)
            return error_response(StorageFull(), request.method)
        log.exception("storage error on %s %s", request.method, request.path)
        return error_response(
            RegistryError(f"storage error: {exc.strerror or exc}"), request.method
        )
    except Exception as exc:
        stored = _object_store_failure(request, exc)
        if stored is not None:
            return stored
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RegistryError("internal error"), request.method)


def _object_store_failure(request: web.Request, exc: Exception) -> web.Response | None:
    """503 UNAVAILABLE when the S3 client failed (the store is down, erroring or too
    slow), logged in one line: an outage fails every request, never with a traceback."""
    stored = object_store_error(exc)
    if stored is None:
        return None
    reason = " ".join(str(exc).split())[:300]
    log.error("object store error on %s %s: %s", request.method, request.path, reason)
    return error_response(stored, request.method)


async def add_api_version(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")
