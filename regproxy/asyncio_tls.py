"""Every use of asyncio's SSL transport beyond its documented API, in one place: handing
a TLS connection to a thread for the rest of a body: a response body the server sends
(`tls_sender`), or an upstream's response body the proxy reads (`sockbody`).

Why: a blob file over TLS is read, encrypted and written per byte; done by asyncio's SSL
transport, Python runs on the event loop for every write (see `tls_sender`). The thread
writes TLS records with the connection's own `SSLObject`, which asyncio keeps private.

Relies on (checked with CPython 3.11, whose `asyncio.sslproto` 3.12 and 3.13 keep):
the transport asyncio returns for a TLS server connection holding its `SSLProtocol` as
`_ssl_protocol`; that protocol's `_sslobj` (an `ssl.SSLObject`), `_outgoing` (the
`ssl.MemoryBIO` it writes records to), `_incoming` (the one it reads records from, where
records asyncio has read but not decrypted wait), `_transport` (the socket transport under it),
`_state` (`SSLProtocolState.WRAPPED` while application data flows) and
`_app_reading_paused` (set, it reads nothing for the application, not even in a read
already scheduled); and the protocol using `_sslobj` and `_outgoing` only when it
reads for the application, when the application writes, and when the connection
closes (see `Handover` for how a loan excludes each). Also, as
`aiohttp_adapter.send_file_range` does: `StreamResponse.prepare()` handing the head to
the transport at once, so what the thread writes follows it. `tests/test_asyncio_tls.py`
checks each assumption on its own, so a Python release that breaks one fails there;
where the parts are not found, `take` returns None and the body goes through the SSL
transport as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from asyncio import sslproto
from typing import Any

from regproxy.tls_sender import TlsChannel

#: how long `flushed` waits for what was written before (a response head) to leave the
#: connection's buffers
FLUSH_WAIT = 1.0


def _parts(transport: asyncio.BaseTransport | None) -> tuple[Any, Any] | None:
    """The SSL protocol behind `transport` and the socket transport under it, when they
    are asyncio's own and the connection is carrying application data."""
    protocol = getattr(transport, "_ssl_protocol", None)
    if transport is None or protocol is None or transport.is_closing():
        return None
    raw = getattr(protocol, "_transport", None)
    if not (
        isinstance(getattr(protocol, "_sslobj", None), ssl.SSLObject)
        and isinstance(getattr(protocol, "_outgoing", None), ssl.MemoryBIO)
        and isinstance(getattr(protocol, "_incoming", None), ssl.MemoryBIO)
        and isinstance(raw, asyncio.Transport)
        and getattr(protocol, "_state", None) is sslproto.SSLProtocolState.WRAPPED
        and not raw.is_closing()
        and raw.get_extra_info("socket") is not None
    ):
        return None
    return protocol, raw


async def flushed(transport: asyncio.BaseTransport | None) -> bool:
    """Wait up to `FLUSH_WAIT` for what was written before (a response head) to leave
    the TLS connection's buffers; False when it did not, or the connection cannot be
    handed over at all."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + FLUSH_WAIT
    while (parts := _parts(transport)) is not None:
        if not (_buffered(transport) or parts[1].get_write_buffer_size()):
            return True
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.005)
    return False


def _buffered(transport: Any) -> int:
    return int(transport.get_write_buffer_size())


class Handover:
    """A TLS connection lent to a thread: `channel` for the thread; `give_back` (on the
    event loop, after the thread ended) returns it.

    While lent, asyncio must not use the connection's `SSLObject` or its outgoing BIO
    (OpenSSL's objects are not for two threads at once, and records taken from the BIO
    by asyncio would reach the socket out of order). asyncio uses them when data is
    read for the application, when the application writes, and when the connection
    closes; so, for the loan:
    - the socket is not read, and the SSL protocol reads nothing for the application
      (its `_app_reading_paused`: a read it had already scheduled does nothing either);
      a pipelined request waits in the kernel or the protocol's buffer;
    - the transport's `close`, `abort`, `write`, `writelines`, `pause_reading` and
      `resume_reading` are held back: aiohttp may close a connection whose request it
      cancelled (a server stopping) before the thread has seen `stop`. A close, an
      abort or a change of reading asked for meanwhile happens in `give_back`; a write
      cannot follow a body the thread may have left unfinished, so it cuts the
      connection there."""

    HELD = ("close", "abort", "write", "writelines", "pause_reading", "resume_reading")

    def __init__(self, transport: Any, protocol: Any, raw: asyncio.Transport) -> None:
        self._transport = transport
        self._protocol = protocol
        self._raw = raw
        # the duplicate first: out of descriptors, nothing has changed yet (OSError)
        fd = os.dup(raw.get_extra_info("socket").fileno())
        self.channel = TlsChannel(protocol._sslobj, protocol._outgoing, fd, protocol._incoming)
        self._asked: set[str] = set()
        for name in self.HELD:
            setattr(transport, name, self._holder(name))
        self._raw_paused = raw.is_reading()
        if self._raw_paused:
            raw.pause_reading()
        self._app_paused: bool = protocol._app_reading_paused
        protocol._app_reading_paused = True

    def _holder(self, name: str) -> Any:
        def held(*args: object, **kwargs: object) -> None:
            if name.startswith("write"):
                self._asked.add("abort")
            elif name.endswith("_reading"):
                self._app_paused = name == "pause_reading"
            else:
                self._asked.add(name)

        return held

    def give_back(self, error: BaseException | None) -> None:
        """End the loan: the held methods back, the duplicate closed. The connection is
        cut when the thread failed (it may have stopped inside a TLS record) or a write
        or an abort was asked for meanwhile; closed when a close was; otherwise reading
        goes on as the application last asked (a resume also serves what waited)."""
        for name in self.HELD:
            with contextlib.suppress(AttributeError):
                delattr(self._transport, name)
        os.close(self.channel.fd)
        if error is not None or "abort" in self._asked:
            self._transport.abort()
            return
        if "close" in self._asked:
            self._transport.close()
            return
        if self._raw_paused and not self._raw.is_closing():
            self._raw.resume_reading()
        if not self._app_paused:
            self._transport.resume_reading()  # clears the protocol's flag, reads what waits


def take(transport: asyncio.BaseTransport | None) -> Handover | None:
    """Lend the TLS connection of `transport` to a thread (see `Handover`), or None when
    it cannot be: not asyncio's SSL transport, closing, or something still in its
    buffers (`flushed` waits for that). Synchronous, so nothing runs in between."""
    parts = _parts(transport)
    if parts is None or _buffered(transport) or parts[1].get_write_buffer_size():
        return None
    try:
        return Handover(transport, *parts)
    except OSError:  # no descriptor for the duplicate: the event loop sends the body
        return None
