"""The all-in-one lab harness: start N nodes on this machine, inject faults."""
