"""``aecp node run``: build the node's parts from its settings and run the agent until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aecp.common import log as logsetup
from aecp.common.errors import ConfigError
from aecp.common.pki import Bundle
from aecp.compute.hypervisor import Accel
from aecp.compute.images.tiny import default_cache_dir
from aecp.compute.qemu.accel import probe_accel
from aecp.compute.qemu.argv import longest_socket
from aecp.compute.qemu.driver import QemuHypervisor
from aecp.conf.settings import MAX_SOCKET_PATH, NodeSettings
from aecp.node.agent import NodeAgent, install_signal_handlers
from aecp.store.etcd import EtcdStore

log = logging.getLogger(__name__)


async def decide_accel(settings: NodeSettings) -> tuple[Accel, str]:
    """The configured accelerator, or the probed one for ``auto`` (cached per machine)."""
    if settings.compute.accel != "auto":
        return Accel(settings.compute.accel), "configured"
    image = Path(settings.compute.probe_image) if settings.compute.probe_image else None
    cache = default_cache_dir() / "accel.json"
    accel = await asyncio.to_thread(
        probe_accel, cache, probe_image=image, qemu_binary=settings.compute.qemu_binary
    )
    return accel, "probed: a KVM guest must reach its boot marker" if image else "no probe image"


def check_runtime_paths(settings: NodeSettings) -> None:
    """``ConfigError`` if the VMs' unix sockets under the run dir would be too long: the
    settings cannot know the QEMU driver's layout, so this is checked here, before anything
    starts, instead of failing every VM's launch."""
    sock = longest_socket(settings.run_dir)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(
            [
                f"data_dir: too long: a VM's console socket {sock} would exceed the "
                f"{MAX_SOCKET_PATH} bytes of a Unix socket path"
            ]
        )


async def run_node(settings: NodeSettings) -> None:
    """Run one node process until SIGTERM/SIGINT. VMs keep running afterwards."""
    check_runtime_paths(settings)
    logsetup.setup(settings.log_level)
    for d in (settings.data_dir, settings.run_dir, settings.vm_dir, settings.images_dir):
        d.mkdir(parents=True, exist_ok=True)
    accel, reason = await decide_accel(settings)
    store = EtcdStore(
        settings.store.endpoints,
        tls=Bundle(settings.security.tls_dir),
        timeout=settings.store.timeout,
    )
    hv = QemuHypervisor(settings.run_dir, qemu_binary=settings.compute.qemu_binary, accel=accel)
    agent = NodeAgent(settings, store, hv, accel, reason)
    install_signal_handlers(agent)
    try:
        await agent.run()
    finally:
        await store.close()
