"""Hand-built upper-layer PDUs (PS3.8 9.3), for peers that pynetdicom would not be: bogus
AE titles, absurd numbers of transfer syntaxes, unknown PDU types."""

from __future__ import annotations

import socket
import struct

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: bytes, calling: bytes, contexts: list[tuple[bytes, list[bytes]]],
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU; AE titles are padded or cut to 16 bytes as they are."""
    items = _item(0x10, APPLICATION_CONTEXT)
    for index, (abstract, syntaxes) in enumerate(contexts):
        body = struct.pack(">BBBB", (2 * index + 1) % 256, 0, 0, 0) + _item(0x30, abstract)
        body += b"".join(_item(0x40, ts) for ts in syntaxes)
        items += _item(0x20, body)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    header = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    body = header + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def exchange(port: int, pdu: bytes, timeout: float = 10.0) -> bytes:
    """Send ``pdu`` and return the first reply PDU's bytes (b"" when the node closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(pdu)
        head = b""
        while len(head) < 6:
            chunk = sock.recv(6 - len(head))
            if not chunk:
                return head
            head += chunk
        (length,) = struct.unpack(">I", head[2:6])
        rest = b""
        while len(rest) < length:
            chunk = sock.recv(length - len(rest))
            if not chunk:
                break
            rest += chunk
        return head + rest
