"""The QEMU driver of the hypervisor contract.

``argv`` turns an ``InstanceSpec`` into a QEMU command line (pure); ``qmp`` is the one adapter over
``qemu.qmp``; ``driver`` owns the QEMU process lifecycle (``QemuHypervisor``); ``accel`` decides,
once per machine, whether KVM really works or TCG must be used.
"""
