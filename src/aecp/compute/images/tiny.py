"""The tiny guest image: a bootable raw disk built without root from Debian packages.

Boot chain: SeaBIOS -> syslinux on a FAT file system that fills the whole disk (a "superfloppy",
no partition table) -> the Debian cloud kernel -> a gzip'd cpio initramfs whose PID 1 is busybox
``init``. VMs boot it like a real disk: no ``-kernel``/``-initrd`` on the QEMU command line.

What the guest does is defined by the files under ``guest/`` (copied into the initramfs):

* SMBIOS type 1 ``manufacturer=AECP,product=<vm-name>,serial=<uuid>`` names the guest; it prints
  ``AECP-BOOT name=<vm-name> uuid=<uuid>`` (``unknown`` for either when the manufacturer is not
  AECP), then ``AECP-NET ip=<addr>`` or ``AECP-NET none`` (DHCP on eth0, gives up in ~3 s);
* busybox ``httpd`` on port 80 serves ``AECP tiny guest <vm-name>``;
* ``acpid`` turns an ACPI power-button press into ``AECP-POWEROFF`` and a clean poweroff;
* a root shell (prompt ``aecp:<cwd># ``) is respawned on ttyS0;
* ``/bin/aecp-pattern write|verify DEV SEED MIB``, also run on ``/dev/vdb`` at boot for each
  SMBIOS type 11 string ``aecp.pattern=write:SEED:MIB`` / ``aecp.pattern=verify:SEED:MIB``.

Building needs ``apt-get``/``apt-cache`` with package lists, ``dpkg-deb``, ``cpio``, ``mkfs.fat``,
``syslinux`` (the mtools installer) and ``mcopy``; none of it needs root. Downloaded packages are
kept in ``<cache>/debs`` and re-used.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aecp.common.errors import ImageError
from aecp.common.proc import CommandFailed, run

BOOT_MARKER = "AECP-BOOT"
NET_MARKER = "AECP-NET"
POWEROFF_MARKER = "AECP-POWEROFF"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Kernel modules the guest loads (with their dependencies, each after what it depends on).
MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "evdev",
    "button",
)
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
DISK_MIB = 64
GUEST_DIR = Path(__file__).with_name("guest")
BUILD_INFO_NAME = "aecp-build.json"

_MIB = 1024 * 1024
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
_NO_APT_LISTS = (
    "cannot resolve the kernel package {pkg!r} with apt-cache: the apt package lists are"
    " missing or stale. Run `apt-get update` as root (or `make run`), then build again."
)

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$AECP_CACHE_DIR`` if set, else ``~/.cache/aecp`` (not created here)."""
    env = os.environ.get("AECP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "aecp"


def default_image_path(cache_dir: Path | None = None) -> Path:
    """Where the tiny image lives by default: ``<cache>/images/tiny.img``."""
    return (cache_dir or default_cache_dir()) / "images" / "tiny.img"


def syslinux_cfg() -> str:
    """The boot loader configuration written into the image."""
    return (
        "SERIAL 0 115200\n"
        "DEFAULT aecp\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL aecp\n  LINUX vmlinuz\n  INITRD initrd.gz\n  APPEND {KERNEL_CMDLINE}\n"
    )


def recipe_digest() -> str:
    """A hash of everything that shapes the image except the Debian packages themselves.

    Covers this module's source and the guest files: an image whose stored digest differs
    (guest files edited, module list changed...) is stale.
    """
    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(p for p in GUEST_DIR.rglob("*") if p.is_file()):
        h.update(path.relative_to(GUEST_DIR).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def read_build_info(image: Path) -> dict[str, object] | None:
    """The build record stored inside ``image``; None if the file is not a tiny image."""
    try:
        with image.open("rb") as f:
            f.seek(510)
            if f.read(2) != b"\x55\xaa":
                return None
    except OSError:
        return None
    argv = [_which("mtype"), "-i", str(image), f"::{BUILD_INFO_NAME}"]
    try:
        res = run(argv, check=False, env=_MTOOLS_ENV)
    except OSError:
        return None
    if res.returncode != 0:
        return None
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def image_is_current(image: Path) -> bool:
    """True if ``image`` is a complete tiny image built from the current recipe."""
    info = read_build_info(image)
    return info is not None and info.get("recipe") == recipe_digest()


def ensure_tiny_image(cache_dir: Path | None = None) -> Path:
    """Return the default tiny image, building it first if it is missing or stale.

    Safe to call from several processes at once: builds are serialised by a lock file.
    """
    dest = default_image_path(cache_dir)
    if image_is_current(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(".tiny.lock")):
        if image_is_current(dest):
            return dest
        return build_tiny(dest, cache_dir=cache_dir)


def build_tiny(
    dest: Path | None = None,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build the tiny image at ``dest`` (default ``<cache>/images/tiny.img``) and return it.

    The image is written to a temporary file next to ``dest`` and renamed over it, so ``dest``
    is always either absent, the old image or the complete new one. Raises ``ImageError`` when
    a package cannot be obtained or a build tool fails.
    """
    cache = cache_dir or default_cache_dir()
    dest = dest or default_image_path(cache)
    say: Progress = progress or (lambda _msg: None)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kernel_deb = _kernel_deb(debs, say)
    busybox_deb = _fetch_deb(BUSYBOX_PACKAGE, debs, say)
    with tempfile.TemporaryDirectory(prefix="tiny-build-", dir=cache) as tmp:
        work = Path(tmp)
        say(f"extracting {kernel_deb.name} and {busybox_deb.name}")
        _extract(kernel_deb, work / "kernel")
        _extract(busybox_deb, work / "busybox")
        boot = work / "boot"
        boot.mkdir()
        shutil.copyfile(_find_kernel(work / "kernel"), boot / "vmlinuz")
        say("writing the initramfs")
        _stage_root(work / "root", work / "kernel", work / "busybox")
        _write_initramfs(work / "root", boot / "initrd.gz")
        (boot / "syslinux.cfg").write_text(syslinux_cfg())
        info = {"recipe": recipe_digest(), "kernel": kernel_deb.name, "busybox": busybox_deb.name}
        (boot / BUILD_INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")
        say(f"writing the {DISK_MIB} MiB boot disk")
        _install_disk(dest, sorted(boot.iterdir()))
    say(f"built {dest}")
    return dest


# --- packages ---------------------------------------------------------------------------------


def resolve_kernel_package() -> str:
    """The exact ``linux-image-<version>-cloud-amd64`` package the meta package depends on."""
    try:
        res = run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=120)
    except (CommandFailed, OSError) as e:
        raise ImageError(_NO_APT_LISTS.format(pkg=KERNEL_META_PACKAGE), detail=str(e)) from e
    for line in res.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        name = value.strip().strip("<>")
        if key == "Depends" and name.startswith("linux-image-"):
            return name
    raise ImageError(_NO_APT_LISTS.format(pkg=KERNEL_META_PACKAGE), detail=res.stdout)


def _kernel_deb(debs: Path, say: Progress) -> Path:
    """The kernel .deb: the current one from apt, or the newest cached one when apt cannot say."""
    say(f"resolving {KERNEL_META_PACKAGE}")
    try:
        name = resolve_kernel_package()
    except ImageError:
        cached = _newest(debs.glob("linux-image-*-cloud-amd64_*.deb"))
        if cached is None:
            raise
        say(f"apt cannot resolve the kernel; re-using {cached.name}")
        return cached
    return _fetch_deb(name, debs, say)


def _fetch_deb(name: str, debs: Path, say: Progress) -> Path:
    """``debs/<name>_*.deb``, downloaded with ``apt-get download <name>`` unless already there."""
    pattern = f"{glob.escape(name)}_*.deb"
    found = _newest(debs.glob(pattern))
    if found is None:
        say(f"downloading {name}")
        try:
            run(["apt-get", "download", name], cwd=debs, timeout=900)
        except (CommandFailed, OSError) as e:
            raise ImageError(
                f"apt-get download {name} failed; run `apt-get update` as root (or `make run`)",
                package=name,
                detail=str(e),
            ) from e
        found = _newest(debs.glob(pattern))
    if found is None:
        raise ImageError(f"apt-get download {name} produced no .deb in {debs}", package=name)
    return found


def _newest(paths: Iterable[Path]) -> Path | None:
    """The most recently downloaded of ``paths``, or None if there is none."""
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def _extract(deb: Path, into: Path) -> None:
    """Unpack the files of ``deb`` under ``into`` (``dpkg-deb -x``; no root needed)."""
    into.mkdir(parents=True)
    _tool(["dpkg-deb", "-x", str(deb), str(into)])


def _find_kernel(kroot: Path) -> Path:
    kernels = sorted(kroot.glob("boot/vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one boot/vmlinuz-* in the kernel package, found {kernels}")
    return kernels[0]


# --- initramfs --------------------------------------------------------------------------------


def _stage_root(root: Path, kroot: Path, broot: Path) -> None:
    """Lay out the guest's root file system under ``root``: guest files, busybox, modules."""
    shutil.copytree(GUEST_DIR, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "var/log", "lib/aecp/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var" / "run").symlink_to("/run")
    busybox = root / "bin" / "busybox"
    busybox.parent.mkdir(exist_ok=True)
    shutil.copyfile(broot / "bin" / "busybox", busybox)
    busybox.chmod(0o755)
    applets = _tool([str(busybox), "--list-full"]).split()
    for rel in [*applets, "init"]:
        link = root / rel
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    order = _install_modules(kroot, root / "lib" / "aecp" / "modules")
    (root / "etc" / "aecp").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "aecp" / "modules").write_text("\n".join(order) + "\n")
    _fix_modes(root)


def _install_modules(kroot: Path, dest: Path) -> list[str]:
    """Copy ``MODULES`` and their dependencies to ``dest/<name>.ko`` (decompressed).

    Returns the load order: every module after the modules it depends on (``modinfo``), and
    otherwise in ``MODULES`` order.
    """
    index: dict[str, Path] = {}
    for base in (kroot / "lib" / "modules", kroot / "usr" / "lib" / "modules"):
        for path in sorted(base.rglob("*.ko*")) if base.is_dir() else []:
            index.setdefault(path.name.split(".ko")[0].replace("-", "_"), path)
    order: list[str] = []
    for name in MODULES:
        _visit_module(name, index, dest, order, [])
    return order


def _visit_module(
    name: str, index: dict[str, Path], dest: Path, order: list[str], stack: list[str]
) -> None:
    """Depth-first: install the dependencies of ``name``, then ``name`` itself."""
    if name in order:
        return
    if name in stack or name not in index:
        raise ImageError(f"kernel module {name!r} is missing or cyclic (via {stack})")
    out = dest / f"{name}.ko"
    _decompress_module(index[name], out)
    depends = _tool(["modinfo", "-F", "depends", str(out)]).strip()
    for dep in filter(None, depends.split(",")):
        _visit_module(dep.replace("-", "_"), index, dest, order, [*stack, name])
    order.append(name)


def _decompress_module(src: Path, out: Path) -> None:
    """Write module ``src`` (plain, .xz, .gz or .zst) uncompressed to ``out``."""
    if src.name.endswith(".ko"):
        shutil.copyfile(src, out)
    elif src.name.endswith(".ko.xz"):
        out.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.name.endswith(".ko.gz"):
        out.write_bytes(gzip.decompress(src.read_bytes()))
    elif src.name.endswith(".ko.zst"):
        _tool(["zstd", "-q", "-d", "-f", "-o", str(out), str(src)])
    else:
        raise ImageError(f"unknown kernel module compression: {src.name}")


def _fix_modes(root: Path) -> None:
    """Scripts (files starting with ``#!``) become 0755, other regular files 0644."""
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            path = Path(dirpath) / fname
            if path.is_symlink() or path.name == "busybox":
                continue
            with path.open("rb") as f:
                script = f.read(2) == b"#!"
            path.chmod(0o755 if script else 0o644)


def _write_initramfs(root: Path, out: Path) -> None:
    """Pack ``root`` as a gzip'd newc cpio archive owned by 0:0 (``cpio -R``, no root needed)."""
    entries: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        entries.extend((rel / n).as_posix() for n in [*dirs, *files])
    archive = out.with_suffix(".cpio")
    _tool(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--reproducible", "-0", "-O", str(archive)],
        cwd=root,
        input_data="\0".join(sorted(entries)).encode() + b"\0",
    )
    out.write_bytes(gzip.compress(archive.read_bytes(), compresslevel=9, mtime=0))
    archive.unlink()


# --- disk -------------------------------------------------------------------------------------


def _install_disk(dest: Path, files: list[Path]) -> None:
    """Write a bootable FAT image holding ``files`` next to ``dest``, then rename it to ``dest``."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        os.ftruncate(fd, DISK_MIB * _MIB)
        os.close(fd)
        _tool(["mkfs.fat", "-n", "AECPBOOT", "-i", "41454350", str(tmp)])
        _tool(["syslinux", "--install", str(tmp)])
        _tool(["mcopy", "-i", str(tmp), *map(str, files), "::"], env=_MTOOLS_ENV)
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# --- helpers ----------------------------------------------------------------------------------


def _tool(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input_data: bytes | None = None,
) -> str:
    """Run a build tool; its failure (or absence) becomes an ``ImageError``. Returns stdout."""
    argv = [_which(argv[0]), *argv[1:]]
    try:
        return run(argv, cwd=cwd, env=env, input_data=input_data).stdout
    except CommandFailed as e:
        raise ImageError(f"tiny image build step failed: {e}", argv=argv) from e
    except OSError as e:
        raise ImageError(f"tiny image build tool {argv[0]!r} is not usable: {e}", argv=argv) from e


def _which(tool: str) -> str:
    """``tool`` resolved on ``$PATH`` and then the sbin directories (mkfs.fat, modinfo)."""
    if "/" in tool:
        return tool
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin") or tool


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` body."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
