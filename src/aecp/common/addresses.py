"""Who a network client is, for limits per client: an IPv4 address, or an IPv6 address's /64
(one site has a whole /64: counting its addresses one by one would limit nothing)."""

from __future__ import annotations

import ipaddress


def client_key(address: str) -> str:
    """The client ``address`` counts as (an IPv4-mapped IPv6 address as its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
