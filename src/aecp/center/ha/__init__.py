"""AOC high availability: an active, a passive and a witness (``docs/design/center-ha.md``)."""
