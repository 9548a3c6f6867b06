"""The node agent: lease and self-fencing, VM reconciliation, host capacity, the node process."""
