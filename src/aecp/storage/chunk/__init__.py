"""ABS chunk layer: the replicas of extents stored on one node, and the protocol to reach them.

- ``api``      the contract (``ReplicaClient``) and its value types: the spec.
- ``errors``   ``ChunkError`` and its subclasses.
- ``store``    ``ReplicaStore``: a node's local replicas (thin data files, checksums, epochs,
               generations); with ``meta`` (metadata and its on-disk format), ``files`` (file
               life cycle), ``persist`` (flush and compaction), ``replica`` (request planning
               and validation), ``diskio`` (blocking I/O), ``locks`` (block locks) and
               ``iopool`` (worker threads).
- ``wire``     the replica protocol: sans-I/O codec, frame layout, ops and status codes.
- ``server``   ``ChunkServer``: a store served over TCP.
- ``client``   ``ChunkClient`` (TCP, pipelined) and ``LocalChunkClient`` (in-process).
"""
