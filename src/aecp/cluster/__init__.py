"""The cluster API (api/) and the leader-elected controllers (scheduler)."""
