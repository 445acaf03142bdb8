"""Connected TCP socket pairs on 127.0.0.1, for tests that drive a server's end of a
connection by hand."""

from __future__ import annotations

import socket

#: the socket buffer sizes of a `small` pair
SMALL_BUFFER = 64 * 1024


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(the server's end, the client's), both blocking. `small`: socket buffers of 64 KiB
    on the way from server to client, so a client that reads nothing soon holds the
    server up."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if small:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        client.connect(listener.getsockname())
        server_end, _ = listener.accept()
    if small:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    return server_end, client
