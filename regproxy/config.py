"""Configuration: TOML file (plus `REGPROXY_*` environment overrides) → frozen dataclasses.

Defaults live only here. Unknown keys and wrong types are `ConfigError`s that
name the dotted key, so `serve` can refuse to start with one clear line.

Environment overrides: `REGPROXY_` + the dotted key path in upper case with
`__` between levels and any other non-alphanumeric character as `_`, e.g.
`REGPROXY_SERVER__LISTEN=0.0.0.0:5000` or
`REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__PASSWORD=…`. Values are read as TOML
scalars when they parse as one (numbers, booleans), otherwise as strings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from regproxy.errors import ConfigError
from regproxy.reference import UPSTREAM_NAME_RE

DEFAULT_CONFIG_NAME = "configuration.toml"
ENV_PREFIX = "REGPROXY_"

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*", re.IGNORECASE)
#: `scheme://…`: a URL where a path was expected
_URL_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: S3 bucket names (AWS's rules for general purpose buckets, which S3-compatibles accept)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HTTP_URL_RE = re.compile(r"https?://[^/\s]+(/\S*)?")
#: a forward proxy: http://, optional credentials, a host and an optional port, no path
_PROXY_URL_RE = re.compile(
    r"http://(?:[^@/\s]*@)?(?:\[[0-9a-fA-F:.]+\]|[^:/@\s\[\]]+)(?::\d{1,5})?/?"
)
#: `[server] workers` above this is surely a typo (each worker is a whole process)
MAX_WORKERS = 256
#: what `[server] replica_name` may hold: it goes into a response header as it is
_REPLICA_RE = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `"90s"`, `"5m"`, `"1h"`, `"7d"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f'expected a duration such as 90, "90s", "5m" or "1h", got {value!r}')


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like `"512MiB"`, `"10GB"`, `"1.5G"`."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match:
            unit = (match.group(2) or "").lower().rstrip("b")
            power = "kmgtp".find(unit[:1]) + 1 if unit else 0
            # "GB" is decimal; "GiB" and a bare "G" are binary (test before "b" was stripped)
            decimal = (match.group(2) or "").lower().endswith("b") and not unit.endswith("i")
            base = 1000 if decimal else 1024
            return int(float(match.group(1)) * base**power)
    raise ValueError(f'expected a size such as 1073741824, "512MiB" or "10GB", got {value!r}')


class Duration(float):
    """Marker type: seconds, written as a number or a string with a unit."""


class ByteSize(int):
    """Marker type: bytes, written as a number or a string with a unit."""


class WorkerCount(int):
    """Marker type: a number of processes, or `"auto"` (one per core this process may use)."""


def parse_workers(value: Any) -> int:
    """Processes from a positive integer or `"auto"` (the cores available to this process)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f'expected 1 to {MAX_WORKERS} workers or "auto", got {value!r}')


class Secret(str):
    """A string never shown in logs or reprs."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class S3Location:
    """A store on S3, `s3://bucket[/prefix]`: a URL, never made absolute like a path.

    The prefix has no slash at either end and no empty, `.` or `..` segment, so
    `f"{prefix}/{key}"` is the one way a store's keys are named.
    """

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket[/prefix][/]` → S3Location; ValueError naming what is wrong."""
        if not url.startswith("s3://"):
            raise ValueError(f"expected s3://BUCKET[/PREFIX], got {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(
                f"{bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, "
                "dots and hyphens; the endpoint goes in [s3] endpoint)"
            )
        prefix = prefix.removesuffix("/")
        if any(ord(c) < 32 or c in "\\?#" for c in prefix):
            raise ValueError(f"the prefix of {url!r} holds a control character, \\, ? or #")
        for segment in prefix.split("/") if prefix else []:
            if segment in ("", ".", ".."):
                raise ValueError(f"the prefix of {url!r} has an empty, . or .. segment")
            if len(segment.encode()) > 255:
                raise ValueError(f"the prefix of {url!r} has a segment over 255 bytes")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.url

    def overlaps(self, other: S3Location) -> bool:
        """True when one location's keys can be the other's (same bucket, nested prefix)."""
        if self.bucket != other.bucket:
            return False
        if not self.prefix or not other.prefix:
            return True
        mine, theirs = f"{self.prefix}/", f"{other.prefix}/"
        return mine.startswith(theirs) or theirs.startswith(mine)


#: where a store lives: a local folder, or a bucket (and prefix) on S3
StorageLocation = Path | S3Location


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:5000"
    #: upload sessions are purged this long after they started, even if still in use
    #: (never in the middle of a body)
    upload_max_age: Duration = Duration(86400)
    #: upload sessions that received nothing for this long are purged (abandoned pushes)
    upload_idle_timeout: Duration = Duration(900)
    #: upload sessions open at once, all clients together (beyond: 429)
    max_upload_sessions: int = 1000
    #: how long in-flight requests may run on in a graceful stop
    shutdown_timeout: Duration = Duration(30)
    #: serve HTTPS directly (PEM files); SIGHUP reloads them
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: behind a reverse proxy: build absolute URLs from X-Forwarded-Proto/Host
    trust_forwarded_headers: bool = False
    #: upload sessions one client (user, or address when anonymous) may hold open at once
    max_uploads_per_client: int = 100
    #: a request body that sends nothing for this long is cut off (slow clients)
    body_timeout: Duration = Duration(60)
    #: after `body_timeout`, a request body averaging fewer bytes per second than this is
    #: cut off (a trickle that never quite stalls); 0 turns the rule off
    body_min_rate: ByteSize = ByteSize(1024)
    #: large uploads: bytes past the first 64 MiB bypass the page cache (O_DIRECT); turn
    #: off where direct I/O is slow, such as temporary storage on NFS
    direct_writes: bool = True
    #: request bodies held in memory at once, all requests together (manifests); past it
    #: a body waits briefly for room, then is refused with 429
    body_memory: ByteSize = ByteSize(64 * 1024 * 1024)
    #: processes serving `listen` together, pre-forked by one supervisor (`"auto"`: one per
    #: core); 1 is a single process with no supervisor
    workers: WorkerCount = WorkerCount(1)
    #: the `X-Regproxy-Replica` response header; none: the host name. With several workers
    #: `-<worker number>` is appended
    replica_name: str | None = None
    #: the URL other replicas reach this one at (requests for its upload sessions and
    #: the blobs it is fetching are forwarded there); none: http(s)://<listen host or,
    #: for a wildcard address, the host's FQDN>:<port>
    advertise_url: str | None = None

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    username: str | None = None
    password: Secret | None = None
    password_env: str | None = None
    password_file: Path | None = None
    tag_ttl: Duration = Duration(300)
    #: forward proxy for this upstream's requests (`http://[user:pass@]host:port`); none:
    #: HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment
    proxy: str | None = None
    #: PEM CA certificate(s) trusted for this upstream besides the system's (a private CA)
    ca_file: Path | None = None
    #: PEM client certificate and key for mutual TLS with this upstream's host
    tls_client_certificate: Path | None = None
    tls_client_key: Path | None = None

    def resolved_password(self) -> Secret | None:
        """The password from the config, an environment variable or a file."""
        if self.password is not None:
            return self.password
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"password_env: environment variable {self.password_env} is not set"
                )
            return Secret(value)
        if self.password_file:
            try:
                return Secret(self.password_file.read_text().strip())
            except OSError as exc:
                raise ConfigError(
                    f"password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
        return None


@dataclass(frozen=True)
class ProxyConfig:
    prefix: str = "p"
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    #: answer un-prefixed pulls of unknown local repositories from this upstream (dockerd mirror)
    mirror_upstream: str | None = None


@dataclass(frozen=True)
class AccessRule:
    """Who may pull, push and delete in repositories matching `repository` (a glob)."""

    repository: str
    pull: list[str] = field(default_factory=list)
    push: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuthConfig:
    #: htpasswd file with bcrypt entries; setting it enables authentication
    htpasswd: Path | None = None
    #: "token" (Docker token flow with a built-in token endpoint) or "basic"
    mode: str = "token"
    service: str = "regproxy"
    token_ttl: Duration = Duration(300)
    #: HMAC key for tokens; without one a random key is made at start (tokens die on restart)
    signing_key_file: Path | None = None
    signing_key_env: str | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: first match wins; a repository no rule matches: authenticated users only
    rules: list[AccessRule] = field(default_factory=list)
    #: who may pull through the cache (`p/<upstream>/…`, `?ns=`)
    proxy_pull: list[str] = field(default_factory=lambda: ["@authenticated"])

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None

    def signing_key(self) -> bytes | None:
        if self.signing_key_env:
            value = os.environ.get(self.signing_key_env)
            if not value:
                raise ConfigError(
                    f"auth.signing_key_env: environment variable {self.signing_key_env} is not set"
                )
            return value.encode()
        if self.signing_key_file:
            try:
                return self.signing_key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(
                    f"auth.signing_key_file: cannot read {self.signing_key_file}: {exc.strerror}"
                ) from None
        return None


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    #: "text" (one line per record) or "json" (one JSON object per line)
    format: str = "text"
    #: debug, info, warning or error; `serve --log-level` overrides it
    level: str = "info"
    #: one access line per request (logger `regproxy.access`, at info)
    access: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    #: serve /metrics (and the health endpoints) on this HOST:PORT instead of the main listener
    listen: str | None = None
    #: how old the stored bytes/objects figures may get before a scrape starts a new walk
    store_scan_interval: Duration = Duration(300)


@dataclass(frozen=True)
class HealthConfig:
    #: /readyz fails when a storage folder's filesystem has less free space than this
    min_free_space: ByteSize = ByteSize(256 * 1024 * 1024)


@dataclass(frozen=True)
class UiConfig:
    #: serve the web page at `/` and `/ui/…` (the registry API under `/v2/` is unaffected)
    enabled: bool = True
    #: the page's title and heading
    title: str = "regproxy"
    #: how old the overview's repository list may get before a view starts a new scan
    #: (0: every view waits for a fresh one)
    refresh_interval: Duration = Duration(30)


@dataclass(frozen=True)
class S3Config:
    """How to reach S3 when a store is `s3://…` (unused otherwise).

    Credentials: `access_key_id` with the secret from `secret_access_key_env` or
    `secret_access_key_file`, or else the standard AWS chain (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance and pod roles).
    """

    #: the S3 API's base URL (`http(s)://host[:port]`); none: AWS itself
    endpoint: str | None = None
    #: none: AWS_DEFAULT_REGION, the AWS profile's, AWS_REGION, else us-east-1
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key_env: str | None = None
    secret_access_key_file: Path | None = None
    #: blob GETs answer 307 to a short-lived presigned URL instead of relaying the bytes
    redirect: bool = False
    #: the endpoint presigned URLs name, when clients reach S3 by another address than
    #: regproxy does (a signature covers the host)
    public_endpoint: str | None = None
    #: how long a process remembers what a pull read from S3 (a tag's digest, a manifest's
    #: media type, a tag list, a blob's size and link): another process's push is seen at
    #: most this late; "0s" asks S3 every time
    metadata_ttl: Duration = Duration(1)

    def resolved_secret_access_key(self) -> Secret | None:
        """The secret key from its environment variable or file; None: the AWS chain."""
        if self.secret_access_key_env:
            value = os.environ.get(self.secret_access_key_env)
            if not value:
                raise ConfigError(
                    f"s3.secret_access_key_env: environment variable "
                    f"{self.secret_access_key_env} is not set"
                )
            return Secret(value)
        if self.secret_access_key_file:
            try:
                return Secret(self.secret_access_key_file.read_text().strip())
            except OSError as exc:
                raise ConfigError(
                    f"s3.secret_access_key_file: cannot read {self.secret_access_key_file}: "
                    f"{exc.strerror}"
                ) from None
        return None


@dataclass(frozen=True)
class Config:
    #: a local folder, or `s3://bucket[/prefix]` (see [s3])
    registry_storage: StorageLocation
    #: always a local folder: upload buffers and spool files
    temporary_registry_storage: Path
    #: a local folder, or `s3://bucket[/prefix]`, independently of registry_storage
    proxy_storage: StorageLocation
    proxy_max_size: ByteSize | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    s3: S3Config = field(default_factory=S3Config)
    source: Path | None = None  # the file this was read from (not a config key)

    def storage_dirs(self) -> tuple[Path, ...]:
        """The local folders to create: the temporary one, and each store not on S3."""
        folders = (self.registry_storage, self.temporary_registry_storage, self.proxy_storage)
        return tuple(folder for folder in folders if isinstance(folder, Path))

    @property
    def uses_s3(self) -> bool:
        """A store is on S3 (only then is boto3 imported)."""
        return isinstance(self.registry_storage, S3Location) or isinstance(
            self.proxy_storage, S3Location
        )


def _without_password(url: str) -> str:
    """`url` with the password of its user info (if any) replaced by `***`."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^:@/]*:)[^@/]*@", r"\1***@", url)


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:5000`) → (host, port); ValueError when malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"expected host:port, got {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host.strip("[]"), port


def _type_name(tp: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        Path: "a path",
        Duration: "a duration",
        ByteSize: "a size",
        WorkerCount: 'a number of workers or "auto"',
        Secret: "a string",
        S3Location: "an s3:// URL",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, base: Path) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        s3_like = isinstance(value, str) and (_URL_RE.match(value) or value.startswith("s3:"))
        if S3Location in options and s3_like:
            try:
                return S3Location.parse(str(value))
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        return _convert(value, options[0], key, base)
    if isinstance(value, _EnvText):
        # an environment value is text for string keys (a numeric password stays a string)
        value = str(value) if tp in (str, Secret, Path) else value.parsed
    if origin is list:
        (item_type,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return [_convert(v, item_type, f"{key}[{i}]", base) for i, v in enumerate(value)]
    if origin is dict:
        _, value_type = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        return {k: _convert(v, value_type, f"{key}.{k}", base) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        return _build(tp, value, base, f"{key}.")
    try:
        if tp is Duration:
            return Duration(parse_duration(value))
        if tp is ByteSize:
            return ByteSize(parse_size(value))
        if tp is WorkerCount:
            return WorkerCount(parse_workers(value))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        if _URL_RE.match(value):
            where = " (only registry_storage and proxy_storage can be on S3)"
            hint = where if value.startswith("s3:") else ""
            raise ConfigError(f"{key}: expected a local path, got the URL {value!r}{hint}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if tp is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return Secret(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: Any, raw: Mapping[str, Any], base: Path, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown configuration key")
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}{name}", base)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**kwargs)


def _env_key(part: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", part.upper())


class _EnvText(str):
    """An environment value: its text, plus its value as a TOML scalar (`parsed`)."""

    parsed: Any


def _env_value(text: str) -> Any:
    value = _EnvText(text)
    try:
        value.parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value.parsed = text
    return value


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply `REGPROXY_A__B__C=value` to raw[a][b][c], matching existing keys by normalised name.

    Returns {dotted key: variable name} of what the environment set.
    """
    applied: dict[str, str] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "REGPROXY_CONFIG":
            continue
        parts = name[len(ENV_PREFIX) :].split("__")
        node = raw
        path: list[str] = []
        for i, part in enumerate(parts):
            match = next((k for k in node if _env_key(k) == part), None)
            key = match if match is not None else part.lower()
            if i == len(parts) - 1:
                node[key] = _env_value(text)
                applied[".".join([*path, key])] = name
            else:
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"{name}: {key} is not a table")
                node = child
                path.append(key)
    return applied


def _blame_env(exc: ConfigError, from_env: dict[str, str]) -> ConfigError:
    """Name the environment variable behind a bad value: `server.listen: … (from REGPROXY_…)`."""
    message = str(exc)
    key = message.partition(":")[0]
    for dotted, variable in from_env.items():
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
            return ConfigError(f"{message} (from environment variable {variable})")
    return exc


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; relative paths are relative to the file's folder."""
    path = Path(path) if path else Path(DEFAULT_CONFIG_NAME)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_mapping(raw, path.resolve().parent, environ, source=path)


def from_mapping(
    raw: dict[str, Any],
    base: Path,
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Config:
    """Validate an already-parsed TOML document (plus environment overrides)."""
    from_env = _apply_env(raw, os.environ if environ is None else environ)
    try:
        return _validated(raw, base, source)
    except ConfigError as exc:
        raise _blame_env(exc, from_env) from None


def _validated(raw: dict[str, Any], base: Path, source: Path | None) -> Config:
    config = _build(Config, raw, base)
    try:
        split_listen(config.server.listen)
    except ValueError as exc:
        raise ConfigError(f"server.listen: {exc}") from None
    replica = config.server.replica_name
    if replica is not None and not _REPLICA_RE.fullmatch(replica):
        raise ConfigError(
            f"server.replica_name: {replica!r} must be 1 to 128 letters, digits or ._:@+=-"
        )
    advertise = config.server.advertise_url
    if advertise is not None and not re.fullmatch(r"https?://[^/\s?#]+/?", advertise):
        raise ConfigError(
            f"server.advertise_url: expected http(s)://host[:port] (no path), got {advertise!r}"
        )
    if config.log.format not in LOG_FORMATS:
        raise ConfigError(f'log.format: expected "text" or "json", got {config.log.format!r}')
    if config.log.level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"log.level: expected one of {', '.join(LOG_LEVELS)}, got {config.log.level!r}"
        )
    if config.metrics.listen is not None:
        try:
            split_listen(config.metrics.listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.listen: {exc}") from None
    prefix = config.proxy.prefix
    if not re.fullmatch(r"[a-z0-9]+", prefix):
        raise ConfigError(f"proxy.prefix: {prefix!r} must be lowercase letters and digits")
    for name, upstream in config.proxy.upstreams.items():
        if not re.fullmatch(r"https?://[^/\s]+(/.*)?", upstream.url):
            raise ConfigError(f"proxy.upstreams.{name}.url: expected an http(s) URL")
        if upstream.proxy and not _PROXY_URL_RE.fullmatch(upstream.proxy):
            raise ConfigError(
                f"proxy.upstreams.{name}.proxy: expected http://[user:password@]host:port, "
                f"got {_without_password(upstream.proxy)!r} (only HTTP proxies are supported)"
            )
        if (upstream.tls_client_certificate is None) != (upstream.tls_client_key is None):
            raise ConfigError(
                f"proxy.upstreams.{name}.tls_client_certificate and tls_client_key go together"
            )
        if not UPSTREAM_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"proxy.upstreams.{name}: an upstream is named like a registry host "
                '(lower case, optionally with :port), e.g. "docker.io" or "10.0.0.5:5000"'
            )
    if config.auth.mode not in ("token", "basic"):
        raise ConfigError(f'auth.mode: expected "token" or "basic", got {config.auth.mode!r}')
    if (config.server.tls_certificate is None) != (config.server.tls_key is None):
        raise ConfigError("server.tls_certificate and server.tls_key go together")
    for i, rule in enumerate(config.auth.rules):
        for action in ("pull", "push", "delete"):
            for who in getattr(rule, action):
                group = who[1:] if who.startswith("@") else None
                if group and group != "authenticated" and group not in config.auth.groups:
                    raise ConfigError(f"auth.rules[{i}].{action}: unknown group {who!r}")
    mirror = config.proxy.mirror_upstream
    if mirror is not None and mirror not in config.proxy.upstreams:
        raise ConfigError(f"proxy.mirror_upstream: {mirror!r} is not a configured upstream")
    registry, proxy = config.registry_storage, config.proxy_storage
    both_on_s3 = isinstance(registry, S3Location) and isinstance(proxy, S3Location)
    if both_on_s3 and registry.overlaps(proxy):
        raise ConfigError(
            f"proxy_storage: {proxy} overlaps registry_storage {registry} "
            "(cache eviction must never reach pushed images): give each its own prefix"
        )
    return dataclasses.replace(config, s3=_validated_s3(config.s3), source=source)


def _validated_s3(s3: S3Config) -> S3Config:
    """`[s3]` checked; an empty string (e.g. from the environment) means "not set"."""
    s3 = dataclasses.replace(
        s3,
        endpoint=s3.endpoint or None,
        region=s3.region or None,
        access_key_id=s3.access_key_id or None,
        secret_access_key_env=s3.secret_access_key_env or None,
        public_endpoint=s3.public_endpoint or None,
    )
    for name in ("endpoint", "public_endpoint"):
        url = getattr(s3, name)
        if url is not None:
            if not _HTTP_URL_RE.fullmatch(url):
                raise ConfigError(f"s3.{name}: expected an http(s) URL, got {url!r}")
            s3 = dataclasses.replace(s3, **{name: url.rstrip("/")})
    secrets = [n for n in ("secret_access_key_env", "secret_access_key_file") if getattr(s3, n)]
    if len(secrets) > 1:
        raise ConfigError("s3.secret_access_key_env and s3.secret_access_key_file: set one")
    if s3.access_key_id and not secrets:
        raise ConfigError(
            "s3.access_key_id: needs s3.secret_access_key_env or s3.secret_access_key_file"
        )
    if secrets and not s3.access_key_id:
        raise ConfigError(f"s3.{secrets[0]}: needs s3.access_key_id")
    return s3
