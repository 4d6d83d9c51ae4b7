"""Pack the Python the guests run into their initramfs.

Reading a few hundred modules over 9p under software emulation costs minutes (each lookup
is a virtio round trip that the emulated CPU pays for); from the initramfs it costs what
the unmarshalling costs. The bundle holds the host's interpreter, its shared libraries,
the standard-library modules the guest program imports (traced by importing them here),
the third-party packages whole, and this checkout's `src/`, laid out as:

    /py/bin/python3          the interpreter (PYTHONHOME=/py)
    /py/lib/python3.X/...    standard library (.py and compiled .pyc), lib-dynload/
    /py/site/...             trio, cryptography, msgpack, pycdlib, ... (whole packages)
    /py/src/...              tvdnet and device_bridge from this checkout
    /lib, /lib64, /usr/lib   the shared libraries the interpreter and extensions need

Anything the trace missed still loads from the host over 9p: the guest's sys.path ends
with the host's own directories.
"""

from __future__ import annotations

import json
import py_compile
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# What the guest program imports; the trace follows everything these pull in.
TRACE = [
    "argparse", "json", "secrets", "hmac", "tomllib", "ipaddress", "logging", "selectors",
    "encodings.idna", "encodings.utf_8", "encodings.ascii", "encodings.latin_1",
    "trio", "msgpack", "serial",
    "cryptography.hazmat.primitives.ciphers.aead", "cryptography.hazmat.primitives.kdf.hkdf",
    "cryptography.hazmat.primitives.hashes", "cryptography.hazmat.primitives.hmac",
    "pycdlib", "tvdnet", "tvdnet._node", "tvdnet.core.agent", "tvdnet.keychannel",
    "tvdnet.ports", "tvdnet.core.frames", "device_bridge", "device_bridge._iso",
]  # fmt: skip
# Third-party top-level names copied whole (their data files and lazy imports included).
WHOLE = {
    "trio", "cryptography", "msgpack", "pycdlib", "serial", "sniffio", "outcome", "attr",
    "attrs", "sortedcontainers", "idna", "cffi", "_cffi_backend", "exceptiongroup",
}  # fmt: skip


def trace(python: str) -> list[str]:
    """Files of every module the guest program's imports load, as the guest would."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {TRACE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({getattr(m, '__file__', None) or '' "
        "for m in list(sys.modules.values())} - {''})))\n"
    )
    out = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    files: list[str] = json.loads(out.stdout)
    return files


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    if src.suffix == ".py":
        # The host's own .pyc when it has one (copy2 kept the .py's mtime, so it stays
        # valid); compiled here otherwise.
        name = f"{src.stem}.{sys.implementation.cache_tag}.pyc"
        cached, cache = src.parent / "__pycache__" / name, dst.parent / "__pycache__" / name
        if cached.is_file():
            cache.parent.mkdir(exist_ok=True)
            shutil.copy2(cached, cache)
        else:
            py_compile.compile(str(src), cfile=str(cache), dfile=str(src), doraise=True)


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    found = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            found.append(Path(parts[2]))
        elif parts and parts[0].startswith("/"):
            found.append(Path(parts[0]))
    return found


def build(root: Path, python: str) -> dict[str, str]:
    """Lay the bundle out under `root` (the initramfs tree); return the guest's env."""
    info = json.loads(
        subprocess.run(
            [python, "-c", "import json, sys, sysconfig; print(json.dumps({"
             "'exe': sys.executable, 'base': sys.base_prefix, "
             "'stdlib': sysconfig.get_paths()['stdlib'], "
             "'purelib': sysconfig.get_paths()['purelib'], "
             "'ver': sysconfig.get_python_version()}))"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    stdlib, site, src = Path(info["stdlib"]), Path(info["purelib"]), ROOT / "src"
    py = root / "py"
    lib = py / "lib" / f"python{info['ver']}"
    binaries: list[Path] = []
    exe = Path(info["exe"]).resolve()
    _copy(exe, py / "bin" / "python3")
    binaries.append(exe)
    whole: set[str] = set()
    for name in trace(python):
        path = Path(name)
        for base, target in ((src, py / "src"), (site, py / "site"), (stdlib, lib)):
            if path.is_relative_to(base):
                rel = path.relative_to(base)
                if base == site and rel.parts[0].split(".")[0] in WHOLE:
                    whole.add(rel.parts[0])
                else:
                    _copy(path, target / rel)
                if path.suffix == ".so":
                    binaries.append(path)
                break
    for top in sorted(whole):
        source = site / top
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for path in files:
            if "__pycache__" in path.parts:
                continue
            _copy(path, py / "site" / path.relative_to(site))
            if path.suffix == ".so":
                binaries.append(path)
    # Packages need their __init__ files even where the trace saw only a submodule.
    for tree in (lib, py / "site", py / "src"):
        for directory in [d for d in tree.rglob("*") if d.is_dir() and d.name != "__pycache__"]:
            for base in (stdlib, site, src):
                init = base / directory.relative_to(tree) / "__init__.py"
                if init.is_file() and not (directory / "__init__.py").exists():
                    _copy(init, directory / "__init__.py")
    # Every module sys.prefix detection and startup insist on.
    for landmark in ("os.py", "site.py"):
        _copy(stdlib / landmark, lib / landmark)
    libraries: set[Path] = set()
    for binary in binaries:
        libraries.update(_libraries(binary))
    for library in libraries:
        _copy(library, root / library.relative_to("/"))
        resolved = library.resolve()
        if resolved != library:
            _copy(resolved, root / resolved.relative_to("/"))
    host_path = [str(src), str(site), str(stdlib), str(stdlib / "lib-dynload")]
    return {
        "PYTHONHOME": "/py",
        "PYTHONPATH": ":".join(["/py/src", "/py/site", *("/host" + p for p in host_path)]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(build(out, sys.argv[2] if len(sys.argv) > 2 else sys.executable))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{size / 1e6:.1f} MB", sysconfig.get_python_version())
