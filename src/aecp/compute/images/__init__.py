"""Guest disk images built by AECP itself (``tiny``: a busybox guest that boots from its disk)."""
