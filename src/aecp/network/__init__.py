"""Host networking: the root-only actions (``rootops``) that create namespaces, bridges, veths,
taps, VLANs and nftables rule sets."""
