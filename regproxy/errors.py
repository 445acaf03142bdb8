"""Every error the registry can answer with, one class per OCI error code.

Handlers and the storage core raise these; one middleware renders them as the
OCI JSON envelope. Nothing here knows about aiohttp.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """An error a client sees: OCI code, HTTP status, message and optional detail."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "unknown error"

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(self.message)

    def envelope(self) -> dict[str, Any]:
        """The OCI error body: `{"errors": [{code, message, detail}]}`."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class RangeNotSatisfiable(BlobUploadInvalid):
    """A chunk that does not start at the session offset (the session stays usable)."""

    status, default_message = 416, "requested range not satisfiable"


class BlobUploadUnknown(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code, status, default_message = (
        "DIGEST_INVALID",
        400,
        "provided digest did not match uploaded content",
    )


class ManifestBlobUnknown(RegistryError):
    code, status, default_message = (
        "MANIFEST_BLOB_UNKNOWN",
        400,
        "manifest references a manifest or blob unknown to registry",
    )


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestTooLarge(ManifestInvalid):
    status, default_message = 413, "manifest too large"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown to registry"


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, status, default_message = (
        "SIZE_INVALID",
        400,
        "provided length did not match content length",
    )


class PayloadTooLarge(SizeInvalid):
    status, default_message = 413, "request body too large"


class TagInvalid(RegistryError):
    code, status, default_message = "TAG_INVALID", 400, "manifest tag did not match URI"


class Unauthorized(RegistryError):
    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class BodyEncodingUnsupported(Unsupported):
    """A request body sent with a content coding: registries take bodies as they are."""

    status, default_message = 400, "request bodies are accepted without Content-Encoding only"


class PaginationInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class UpstreamUnavailable(RegistryError):
    """The proxy could not reach an upstream and holds no cached copy."""

    code, status, default_message = "UNAVAILABLE", 503, "upstream registry unavailable"


class StorageFull(RegistryError):
    code, status, default_message = "UNAVAILABLE", 507, "insufficient storage"


class StorageUnavailable(RegistryError):
    """The object store under a store failed a request: down, erroring or too slow."""

    code, status, default_message = "UNAVAILABLE", 503, "object store unavailable"


#: modules of the S3 client stack (boto3, botocore, urllib3 below them): their exceptions
#: are matched by module name, so a server without stores on S3 never imports them
_OBJECT_STORE_MODULES = ("botocore", "boto3", "urllib3", "s3transfer")
#: a few words for botocore's transport failures, by class name
_OBJECT_STORE_CAUSES = {
    "EndpointConnectionError": "cannot connect",
    "ConnectionClosedError": "the connection was closed",
    "ConnectTimeoutError": "no connection in time",
    "ReadTimeoutError": "no answer in time",
    "ResponseStreamingError": "the connection broke during an answer",
    "ProtocolError": "the connection broke",
    "IncompleteReadError": "an answer ended early",
}


def object_store_error(exc: BaseException) -> StorageUnavailable | None:
    """`StorageUnavailable` naming the cause in a few words when `exc` was raised by the
    S3 client stack; None for anything else."""
    if not type(exc).__module__.startswith(_OBJECT_STORE_MODULES):
        return None
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError: S3 answered with an error
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        code = str(response.get("Error", {}).get("Code", ""))
        cause = f"S3 answered {status}" if code in ("", status) else f"S3 answered {status} {code}"
    else:
        name = type(exc).__name__
        cause = _OBJECT_STORE_CAUSES.get(name, name)
    return StorageUnavailable(f"object store unavailable ({cause}); try again later")


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key."""
