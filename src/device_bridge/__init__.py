"""device_bridge: the host-side daemon (the paper's "device") that pushes partial keys."""

__version__ = "0.1.0"
