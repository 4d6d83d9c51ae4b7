"""Protocol constants and the policy numbers of tvdnet v1, in one place.

Values fixed by SPEC.md are marked with the section that fixes them; the rest are
policy choices of this implementation (the spec leaves them open).
"""

from typing import Final

PROTOCOL_VERSION: Final = 1

KEY_LEN: Final = 32  # SPEC §3: every key input is exactly 32 bytes
NONCE_LEN: Final = 16  # SPEC §4: HELLO nonce
INSTANCE_LEN: Final = 8  # SPEC §4: HELLO instance

FRAME_LIMIT: Final = 1 << 20  # SPEC §4: a larger frame closes the connection
MESSAGE_LIMIT: Final = FRAME_LIMIT - 64  # SPEC §4: largest packed [0, seq, body]
# Largest plaintext that still fits one DATA frame: [1, t, n, bin32(ciphertext)] costs at
# most 1 + 1 + 9 + 9 + 5 bytes around a ciphertext of plaintext + 16 bytes of tag.
PLAINTEXT_LIMIT: Final = FRAME_LIMIT - 41
TAG_LEN: Final = 16

SKEW_ALLOWANCE: Final = 2.0  # SPEC §4: default clock-skew allowance, seconds
# Policy bounds of a node's settings (docs/configuration.md): clocks synchronised by NTP
# differ by milliseconds, and an allowance is also how long an ended key keeps working;
# a send that waits over a day for its acknowledgement is a mistake, not a wait.
MAX_ALLOWANCE: Final = 600.0
MAX_SEND_TIMEOUT: Final = 86400.0

# SPEC §4 asks for an ACK within 100 ms of any MSG: the session ACKs at once, and under
# load the ACK rides in the next frame the writer seals anyway.
# SPEC §4 asks for KEY+ACK within 100 ms of a new key or of learning the peer's: it leaves
# KEY_DELAY plus up to KEY_SPREAD after the event (spread by connection), so that one frame
# answers both events when they come close together (at a period change they do), a
# frame sent meanwhile carries it, and a hub's thousand KEYs do not leave in one burst.
KEY_DELAY: Final = 0.010
KEY_SPREAD: Final = 0.050
KEY_SLOTS: Final = 8  # ...in this many steps (each a wake-up of the node's timer)
# A new key for many peers at once: the rest of the key change (KEY, erasure timers,
# dialing) is done this many peers at a time, after the update is acknowledged.
KEY_WORK_CHUNK: Final = 128
# A pair that can go on with its previous key derives the new one at an offset of its own
# after the update arrives, up to a quarter of min(allowance, period length) and at most
# KEY_CHANGE_SPREAD: the same offset at both ends (a hash of the pair and the period), so
# that a hub's 1,200 key changes, and the KEY frames each one costs, spread over that
# time instead of landing in one burst. A frame, a KEY or a new connection that needs the
# new key first derives it at once.
KEY_CHANGE_SPREAD: Final = 0.5
RESEND_INITIAL: Final = 1.0  # SPEC §4: re-send when the oldest has waited 1 s
RESEND_MAX: Final = 30.0  # SPEC §4: backing off to 30 s

# Policy (not fixed by the spec).
HANDSHAKE_TIMEOUT: Final = 10.0  # both HELLOs within this, else CLOSE timeout
KEEPALIVE_INTERVAL: Final = 10.0  # an ACK-only frame after this much silence
IDLE_TIMEOUT: Final = 35.0  # no authenticated DATA for this long: CLOSE timeout
DIAL_BACKOFF_INITIAL: Final = 0.5
DIAL_BACKOFF_MAX: Final = 30.0
SEND_WINDOW_MESSAGES: Final = 4096  # unacknowledged messages per peer
SEND_WINDOW_BYTES: Final = 8 << 20  # unacknowledged packed bytes per peer
# SPEC §4: accepted connections not yet authenticated, before the oldest of the busiest
# source address makes way for a new one.
MAX_UNAUTHENTICATED: Final = 64
KEPT_INSTANCES: Final = 8  # SPEC §4: numberings kept of peer instances no longer current
FORGOTTEN_INSTANCES: Final = 64  # evicted ones whose delivered count is still remembered
DEPARTED_PEERS: Final = 256  # removed peers whose delivered counts are kept, should they return

CHANNEL_LIMIT: Final = 1 << 20  # key-channel message size limit (policy, like FRAME_LIMIT)
CHANNEL_HELLO_RETRY: Final = 1.0  # SPEC §5: the node re-sends hello every 1 s
