"""Deciding, once per machine, whether guests can use KVM or must use TCG.

``/dev/kvm`` being there is not enough (on nested or emulated hosts KVM guests can hang at boot),
so KVM is chosen only when a probe guest really boots under ``accel=kvm``: it must print the boot
marker on its serial console within the timeout. The decision is cached in a JSON file keyed by
the host kernel release and the QEMU version, so the probe runs once per machine.

Blocking (it runs and waits for a QEMU process): call it with ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aecp.common.proc import CommandFailed, run
from aecp.compute.hypervisor import Accel
from aecp.compute.images.tiny import BOOT_MARKER

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelDecision:
    accel: Accel
    reason: str


def probe_accel(
    cache_file: Path,
    *,
    probe_image: Path | None,
    timeout: float = 15,
    qemu_binary: str = "qemu-system-x86_64",
) -> Accel:
    """KVM if ``/dev/kvm`` is usable and ``probe_image`` (raw, bootable) boots under KVM within
    ``timeout`` s; TCG otherwise. Cached in ``cache_file`` per kernel release + QEMU version
    (except the "no probe image" decision, which is not a probe result). Logs the decision."""
    key = _cache_key(qemu_binary)
    cached = _read_cache(cache_file).get(key)
    if cached is not None:
        log.info("accelerator %s (cached for %s: %s)", cached.accel, key, cached.reason)
        return cached.accel
    decision = _decide(probe_image, timeout, qemu_binary)
    log.info("accelerator %s: %s", decision.accel, decision.reason)
    if probe_image is not None:
        _write_cache(cache_file, key, decision)
    return decision.accel


def _decide(probe_image: Path | None, timeout: float, qemu_binary: str) -> AccelDecision:
    if probe_image is None:
        return AccelDecision(Accel.TCG, "no probe image")
    problem = _kvm_device_problem()
    if problem is not None:
        return AccelDecision(Accel.TCG, problem)
    return _boot_probe(probe_image, timeout, qemu_binary)


def _kvm_device_problem() -> str | None:
    """Why /dev/kvm cannot be used, or None if it opens read-write."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_DEVICE} unusable: {exc.strerror}"
    os.close(fd)
    return None


def probe_argv(qemu_binary: str, image: Path, serial_log: Path) -> list[str]:
    """A throw-away KVM guest booting ``image`` (never written: ``snapshot=on``)."""
    drive = str(image).replace(",", ",,")
    return [
        qemu_binary,
        "-machine", "q35,accel=kvm",
        "-cpu", "host",
        "-m", "128",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", f"file:{serial_log}",
        "-drive", f"file={drive},format=raw,if=none,id=disk0,snapshot=on",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
        "-smbios", "type=1,manufacturer=AECP,product=aecp-kvm-probe",
    ]  # fmt: skip


def _boot_probe(image: Path, timeout: float, qemu_binary: str) -> AccelDecision:
    """Boot the probe guest; KVM if the marker shows up in time. The process is always killed."""
    with tempfile.TemporaryDirectory(prefix="aecp-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = probe_argv(qemu_binary, image, serial)
        with (Path(tmp) / "qemu.log").open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            return _watch_probe(proc, serial, Path(tmp) / "qemu.log", timeout)
        finally:
            proc.kill()
            proc.wait()


def _watch_probe(
    proc: subprocess.Popen[bytes], serial: Path, qemu_log: Path, timeout: float
) -> AccelDecision:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial.exists() and BOOT_MARKER in serial.read_text(errors="replace"):
            return AccelDecision(Accel.KVM, "probe guest booted under KVM")
        code = proc.poll()
        if code is not None:
            output = qemu_log.read_text(errors="replace").strip()[-500:]
            return AccelDecision(Accel.TCG, f"KVM probe QEMU exited with {code}: {output}")
        time.sleep(0.1)
    return AccelDecision(Accel.TCG, f"KVM probe guest did not boot within {timeout:g} s")


def _cache_key(qemu_binary: str) -> str:
    try:
        version = run([qemu_binary, "--version"], timeout=30).stdout.splitlines()[0]
    except (CommandFailed, OSError, IndexError) as exc:
        version = f"unknown ({exc})"
    return f"{os.uname().release} | {version}"


def _read_cache(cache_file: Path) -> dict[str, AccelDecision]:
    try:
        raw = json.loads(cache_file.read_text())
        return {k: AccelDecision(Accel(v["accel"]), str(v["reason"])) for k, v in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable accelerator cache %s: %s", cache_file, exc)
        return {}


def _write_cache(cache_file: Path, key: str, decision: AccelDecision) -> None:
    """Add ``key`` to the cache, atomically (write a temp file, rename it over)."""
    entries = {
        k: {"accel": d.accel.value, "reason": d.reason} for k, d in _read_cache(cache_file).items()
    }
    entries[key] = {"accel": decision.accel.value, "reason": decision.reason}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    tmp.replace(cache_file)
