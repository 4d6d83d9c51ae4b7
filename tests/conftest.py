import logging
import sys
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _restore_log_handlers() -> Iterator[None]:
    """Tests that run `tvdnet` or `tvdnet-bridge` in-process (`main([...])`) let them set
    up logging on that test's captured stderr; put the handlers back afterwards, or a
    later test's log records go to a closed stream ("--- Logging error ---")."""
    loggers = [logging.getLogger(), logging.getLogger("device_bridge")]
    saved = [(lg, list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:
        for handler in [h for h in lg.handlers if h not in handlers]:
            lg.removeHandler(handler)
        lg.setLevel(level)
