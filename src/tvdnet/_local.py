"""What the demo, the load test, the benchmarks and the tests need to run a TVD on one
machine: free loopback ports and the commands of this installation."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

__all__ = ["console_command", "free_port", "free_port_block"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """A base port such that base..base+count-1 are free on 127.0.0.1 (below the
    ephemeral range, so that outgoing connections never take them)."""
    rng = random.Random()  # noqa: S311 -- picking ports, not keys
    for _ in range(50):
        base = rng.randrange(10000, 30000 - count)
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no block of {count} free ports on 127.0.0.1")


def console_command(script: str, module: str) -> list[str]:
    """The installed console script beside this Python, else `python -m module`."""
    installed = Path(sys.executable).parent / script
    return [str(installed)] if installed.exists() else [sys.executable, "-m", module]
