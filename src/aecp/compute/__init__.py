"""AVE: the hypervisor contract, the QEMU driver (qemu/), a fake (fake.py) and guest images."""
