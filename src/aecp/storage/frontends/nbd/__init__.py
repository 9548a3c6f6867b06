"""NBD front end: serves a ``BlockDevice`` to NBD clients (QEMU, qemu-img, nbdcopy, fio).

Three pieces, as in the house style:

* ``protocol`` — the sans-I/O codec: bytes from a client in, events out; replies to bytes.
* ``session`` — one connection's state machine (HANDSHAKE → OPTIONS → TRANSMISSION → CLOSED):
  option negotiation, export resolution, and running requests against the device.
* ``server`` — ``NbdServer`` on asyncio streams: accepts connections, pipelines requests.

Wire structures cite sections of the NBD protocol document (``proto.md`` of the
NetworkBlockDevice project).
"""
