"""Meta: volume and extent metadata (persisted in etcd), replica placement and generations."""
