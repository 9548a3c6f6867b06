"""Domain objects (VMs, nodes, images, operations) and their (de)serialization. No I/O."""
