"""Replies sent in the same reactor turn, on plain TCP connections.

Twisted's ``transport.write`` never sends at once: it buffers the bytes, registers the
socket for writability and sends on the reactor's next turn, then unregisters it. For a
link protocol that answers every frame with one byte (ASTM E1381: ENQ, each frame and
EOT get an ACK), that is two ``epoll_ctl`` calls and an extra pass of the reactor loop per
reply, about a quarter of the reactor's time under load. :func:`write_now` sends a reply
at once when nothing is waiting in the transport's buffer (so bytes cannot overtake
earlier ones) and hands whatever the socket did not take to ``transport.write``.

Only a plain :class:`twisted.internet.tcp.Connection` is written to directly. TLS, the
byte capture of DESIGN rule 7 (a protocol wrapper), serial ports and test transports all
get ``transport.write`` unchanged, so they see every byte as before.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp

# What a non-blocking send may answer when the socket cannot take the bytes now; the
# transport's own write then queues them (and reports a real error the usual way).
_TRY_LATER = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS}


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if it is a plain TCP connection with an empty
    buffer; the rest (or all of it, otherwise) through ``transport.write``."""
    if (isinstance(transport, tcp.Connection) and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not transport._tempDataBuffer and transport.producer is None):
        try:
            sent = transport.socket.send(data)
        except OSError as exc:
            if exc.errno not in _TRY_LATER:
                # the transport finds the same error on its own send and closes the
                # connection as it always does
                transport.write(data)
                return
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


__all__ = ["write_now"]
