"""Which TLS 1.3 cipher suite a client gets: AES-128-GCM first, as Go's servers do.

OpenSSL's server order for TLS 1.3 puts AES-256-GCM first, and Python's `ssl` offers no
way to change it (`set_ciphers` only orders TLS 1.2). AES-128-GCM does 10 AES rounds
where AES-256 does 14; with AES-NI a blob sent over TLS costs measurably less CPU, and
encryption is the largest per-byte cost of a pull that regproxy encrypts itself. Docker's
registry (Go's crypto/tls) picks AES-128-GCM for every client with AES hardware, so a
client of regproxy gets what it gets from `registry:2`. Nothing is weaker than before:
the same three suites stay allowed, and TLS 1.2's list is untouched.

The order is set with OpenSSL's own `SSL_CTX_set_ciphersuites`, reached through the
`_ssl` module's libssl. The context's `SSL_CTX *` is the first field after the object
header of CPython's `PySSLContext`; it is used only after OpenSSL, asked for that
pointer's options, answers the context's own options. Where any of that is not so (no
libssl symbols, another Python), the default order stays and TLS works as before.
"""

from __future__ import annotations

import ctypes
import logging
import ssl

log = logging.getLogger(__name__)

#: OpenSSL's default TLS 1.3 suites, AES-128-GCM moved first
SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _libssl() -> ctypes.CDLL | None:
    try:
        import _ssl

        return ctypes.CDLL(_ssl.__file__)
    except (ImportError, OSError, AttributeError):
        return None


def prefer_aes128(context: ssl.SSLContext) -> bool:
    """Put AES-128-GCM first among `context`'s TLS 1.3 suites (server side, where the
    server's order decides); True when done, False when the default order stays."""
    lib = _libssl()
    if lib is None:
        return False
    try:
        get_options = lib.SSL_CTX_get_options
        set_suites = lib.SSL_CTX_set_ciphersuites
    except AttributeError:  # an OpenSSL without them (before 1.1.1)
        return False
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    set_suites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    set_suites.restype = ctypes.c_int
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != context.options:
        log.debug("TLS: SSL_CTX not where expected; OpenSSL's suite order stays")
        return False
    done = set_suites(pointer, SUITES) == 1
    if not done:
        log.debug("TLS: SSL_CTX_set_ciphersuites refused; OpenSSL's suite order stays")
    return done
