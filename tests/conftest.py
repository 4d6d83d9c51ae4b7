import sys
from pathlib import Path

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
