"""Build the end-to-end guests' initramfs: busybox, the kernel modules they need (in
dependency order, from modinfo), and e2e/init.sh as /init. Uses Debian's busybox-static,
kmod's modinfo and cpio."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import bundle

# virtio-serial (the key channel), 9p (the host's Python), virtio-net, virtio-rng (without
# it getrandom() blocks for minutes in a fresh guest, and Python with it), and the CD-ROM of
# approach I (ATA, SCSI CD, ISO 9660).
MODULES = [
    "virtio_pci", "virtio_console", "9p", "9pnet_virtio", "virtio_net",
    "ata_piix", "sr_mod", "isofs", "virtio_rng",
]  # fmt: skip

HERE = Path(__file__).resolve().parent


def kernel_version() -> str:
    versions = sorted(p.name for p in Path("/lib/modules").iterdir())
    if not versions:
        raise RuntimeError("no kernel modules under /lib/modules (apt install linux-image-amd64)")
    return versions[-1]


def _modinfo(version: str, module: str, field: str) -> str:
    result = subprocess.run(
        ["modinfo", "-k", version, "-F", field, module], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def ordered_modules(version: str) -> list[tuple[str, Path]]:
    """Every module MODULES needs, dependencies first."""
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(module: str) -> None:
        if module in seen:
            return
        seen.add(module)
        for dependency in filter(None, _modinfo(version, module, "depends").split(",")):
            visit(dependency)
        path = Path(_modinfo(version, module, "filename"))
        if path.suffix != ".ko":
            raise RuntimeError(f"{path}: compressed modules are not handled here")
        order.append((module, path))

    for module in MODULES:
        visit(module)
    return order


def build(out: Path, python: str) -> Path:
    """The initramfs, uncompressed: unpacking it costs an emulated CPU less than inflating."""
    version = kernel_version()
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found (apt install busybox-static)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bin", "sbin", "proc", "sys", "dev", "modules", "host", "tmp", "run"):
            (root / sub).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        modules = ordered_modules(version)
        for name, path in modules:
            shutil.copy2(path, root / "modules" / f"{name}.ko")
        (root / "modules.order").write_text("\n".join(name for name, _ in modules) + "\n")
        init = root / "init"
        shutil.copy2(HERE / "init.sh", init)
        init.chmod(0o755)
        shutil.copy2(HERE / "guest.py", root / "guest.py")
        environment = bundle.build(root, python)
        libpython = [p for p in root.rglob("libpython*.so*") if p.is_file() and not p.is_symlink()]
        for library in libpython:  # debug symbols are most of its size
            subprocess.run(["strip", "--strip-debug", str(library)], check=False)
        (root / "python.env").write_text(
            "".join(f"export {k}={json.dumps(v)}\n" for k, v in environment.items())
        )
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=files,
            capture_output=True,
            check=True,
        ).stdout
    out.write_bytes(archive)
    return out


def kernel_image() -> Path:
    return Path("/boot") / f"vmlinuz-{kernel_version()}"


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "initramfs.cpio"), sys.executable))
