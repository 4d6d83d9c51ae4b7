"""tvdnet_tools: what runs above the guest library and the bridge, never inside a VM.

- `demo`: `tvdnet demo`, a whole TVD on this machine (bridge and three nodes as processes).
- `loadtest`, `loadworker`: `tvdnet loadtest`, a hub and many peers, and its worker process.
- `forge`: a raw peer that speaks SPEC §4 by hand (the demo's attacker, hostile tests).
- `local`: one TVD on one machine: free ports, console commands, stopping processes, and
  `LocalTvd`, the one way tests, benchmarks and tools write a TVD file and node configs.

`tvdnet demo` and `tvdnet loadtest` reach these through the `tvdnet.commands` entry
points, so the guest's `tvdnet` command never imports this package (install the `tools`
extra for them).
"""
