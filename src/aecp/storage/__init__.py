"""ABS: distributed block storage — Meta (meta/), the local replica store and its wire protocol
(chunk/), the access point that serves volumes (access.py), and front ends (frontends/)."""
