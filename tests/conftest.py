import sys
from pathlib import Path

import pytest
import trio.testing
from hypothesis import HealthCheck, settings

# Tests import their shared helpers as a plain module.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Deterministic (a fixed seed per test) and no per-example deadline: these machines are
# shared, and one example taking 300 ms says nothing about the code.
settings.register_profile(
    "tvdnet",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile("tvdnet")


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """A MockClock for tests that move bytes through the kernel.

    `autojump_clock` jumps the moment every task is blocked, but a pty delivers a write
    through a kernel work queue: the reader may not be readable yet, and the clock would
    run a whole re-send timeout ahead of the bytes. Waiting a little real time first keeps
    the virtual time honest; the tests stay deterministic in what they assert.
    """
    return trio.testing.MockClock(autojump_threshold=0.1)
