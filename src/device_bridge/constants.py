"""The bridge's numbers, in one place: the key channel's re-send rule (SPEC §5) and the
bridge's own policy (none of it fixed by the spec but where a section is named)."""

from typing import Final

from tvdnet.core.constants import CHANNEL_LIMIT

CHANNEL_RESEND_INITIAL: Final = 1.0  # SPEC §5: re-send an unacknowledged update after 1 s
CHANNEL_RESEND_MAX: Final = 8.0  # backing off to this (policy)

BRIDGE_WRITE_TIMEOUT: Final = 2.0  # a key-channel write stuck this long drops that connection
BRIDGE_OUTPUT_LIMIT: Final = 2 * CHANNEL_LIMIT  # bytes queued for one VM before reading pauses
BRIDGE_READ_CHUNK: Final = 1 << 16
# Input is fed to the channel this much at a time, checking the output bound in between:
# every hello is answered with a welcome and the whole update, so 64 KiB of hellos must
# not turn into gigabytes of queued output before the bound is looked at.
BRIDGE_FEED_PIECE: Final = 512
BRIDGE_RECONNECT_INITIAL: Final = 0.5  # re-open a port that failed or closed after this...
BRIDGE_RECONNECT_MAX: Final = 5.0  # ...doubling up to this: never a busy loop
BRIDGE_CLOSE_TIMEOUT: Final = 1.0  # closing a stream may not take longer than this
BRIDGE_KEYSTORE_RETRY: Final = 1.0  # a failed keystore write is retried after this, doubling
BRIDGE_KEYSTORE_RETRY_MAX: Final = 30.0
BRIDGE_SHUTDOWN_WRITE_TIMEOUT: Final = 30.0  # the last keystore write at shutdown
BRIDGE_CONTROL_REQUEST_LIMIT: Final = 4096  # one control-socket request, bytes
BRIDGE_CONTROL_TIMEOUT: Final = 5.0  # a control client has this long to ask
MOVES_IN_KEPT: Final = 1024  # bundle ids a keystore remembers (each opens in one period only)
BRIDGE_ROLLOUT_HISTORY: Final = 256  # periods whose start-to-last-ack record the status keeps

# SPEC §6: scrypt cost of the keystore key (32 MiB, about 0.1 s on a server core).
KEYSTORE_SCRYPT_N: Final = 1 << 15
KEYSTORE_SCRYPT_R: Final = 8
KEYSTORE_SCRYPT_P: Final = 1
KEYSTORE_SCRYPT_MAXMEM: Final = 1 << 30  # refuse a keystore whose kdf asks for more memory

# The bounds of a TVD's period_seconds (docs/bridge.md): below, key updates would fill the
# period (the bridge pushes every VM's, each node derives and logs); above, one key would
# serve for over a year.
MIN_PERIOD_S: Final = 0.5
MAX_PERIOD_S: Final = 366 * 86400.0
