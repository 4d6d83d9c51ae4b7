"""Messages per second and latency between two tvdnet nodes on loopback, next to
plaintext msgpack and TLS 1.3 over the same kind of trio TCP stream, in one run.

Every variant does the same thing: some tasks each send a message and wait for its
acknowledgement, over and over, for `--seconds`; the receiver acknowledges each message.
Latency is from the send call to the acknowledgement. Three loads:

- `64 in flight` (`--senders`): request/ack with coalescing at work;
- `1 in flight`: one message at a time, the latency of a lone message;
- `stream`: 1,024 sends outstanding, a one-way stream as fast as acknowledgements allow.

- tvdnet:    two nodes (`Node.send` returns on the peer's ACK), keys from a bridge loop
             over socketpairs, real clock. Sealing coalesces what is queued (SPEC §4).
- plaintext: msgpack [seq, body] frames and [seq] acks over trio TCP, one writer task
             per side sending whatever is queued in one `send_all` (the same coalescing
             a careful plaintext implementation would do).
- tls:       the plaintext protocol inside `trio.SSLStream`, TLS 1.3, a throwaway CA.

The machine is shared and noisy: variants run interleaved, `--rounds` times, and the
table shows the best round of each (the medians are in the JSON).

    python benchmarks/throughput.py [--seconds 3] [--senders 64] [--rounds 3]
                                    [--json benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nodes import Harness

from tvdnet import WallClock

SIZES = {"64 B": 64, "1 KiB": 1024}


class Result:
    def __init__(self, count: int, seconds: float, latencies: list[float]) -> None:
        self.per_s = count / seconds
        latencies.sort()
        self.p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
        self.p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")


async def _drive(
    send_one: Callable[[bytes], Awaitable[None]], body: bytes, senders: int, seconds: float
) -> Result:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def sender() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await send_one(body)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(senders):
            nursery.start_soon(sender)
    return Result(len(latencies), time.perf_counter() - started, latencies)


# ------------------------------------------------------------------ tvdnet


async def run_tvdnet(body: bytes, senders: int, seconds: float) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(
            Path(tmp), ["vm-a", "vm-b"], period_s=3600.0, epoch=time.time() - 1, clock=WallClock()
        )
        async with h.running():
            await h.wait_keys()
            a, b = h.nodes["vm-a"], h.nodes["vm-b"]

            async def drain() -> None:
                async for _ in b:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await a.send("vm-b", b"warm-up")
                result = await _drive(lambda m: a.send("vm-b", m), body, senders, seconds)
                nursery.cancel_scope.cancel()
            return result


# ------------------------------------------------------------------ baselines


class FramedPeer:
    """msgpack frames over a trio stream: a writer sends whatever is queued at once."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.queue: list[bytes] = []
        self.wake = trio.Event()
        self.packer = msgpack.Packer()

    def write(self, obj: Any) -> None:
        self.queue.append(self.packer.pack(obj))
        self.wake.set()

    async def writer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            data, self.queue = b"".join(self.queue), []
            if data:
                await self.stream.send_all(data)

    async def frames(self) -> Any:
        unpacker = msgpack.Unpacker()
        while data := await self.stream.receive_some(65536):
            unpacker.feed(data)
            for obj in unpacker:
                yield obj


async def run_framed(
    body: bytes,
    senders: int,
    seconds: float,
    wrap_server: Callable[[trio.abc.Stream], Awaitable[trio.abc.Stream]],
    wrap_client: Callable[[trio.abc.Stream], Awaitable[trio.abc.Stream]],
) -> Result:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def server() -> None:
            raw = await listeners[0].accept()
            peer = FramedPeer(await wrap_server(raw))
            nursery.start_soon(peer.writer)
            async for seq, _body in peer.frames():
                peer.write([seq])  # the acknowledgement

        nursery.start_soon(server)
        client = FramedPeer(await wrap_client(await trio.open_tcp_stream("127.0.0.1", port)))
        waiting: dict[int, trio.Event] = {}
        counter = iter(range(1 << 62))

        async def reader() -> None:
            async for (seq,) in client.frames():
                waiting.pop(seq).set()

        nursery.start_soon(client.writer)
        nursery.start_soon(reader)

        async def send_one(message: bytes) -> None:
            seq = next(counter)
            done = waiting[seq] = trio.Event()
            client.write([seq, message])
            await done.wait()

        result = await _drive(send_one, body, senders, seconds)
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    return result


async def _plain(stream: trio.abc.Stream) -> trio.abc.Stream:
    return stream


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a server certificate for 127.0.0.1; TLS 1.3 only."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tvdnet bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_3
        server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client


async def run_tls(body: bytes, senders: int, seconds: float) -> Result:
    server_ctx, client_ctx = _tls_contexts()

    async def wrap_server(stream: trio.abc.Stream) -> trio.abc.Stream:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.do_handshake()
        return tls

    async def wrap_client(stream: trio.abc.Stream) -> trio.abc.Stream:
        tls = trio.SSLStream(stream, client_ctx, server_hostname="127.0.0.1")
        await tls.do_handshake()
        return tls

    return await run_framed(body, senders, seconds, wrap_server, wrap_client)


# ------------------------------------------------------------------ main


STREAM_SENDERS = 1024


def _loads(args: argparse.Namespace) -> dict[str, int]:
    return {
        f"{args.senders} in flight": args.senders,
        "1 in flight": 1,
        f"stream ({STREAM_SENDERS:,} in flight)": STREAM_SENDERS,
    }


async def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    variants: dict[str, Callable[[bytes, int, float], Awaitable[Result]]] = {
        "tvdnet": run_tvdnet,
        "plaintext": lambda b, s, d: run_framed(b, s, d, _plain, _plain),
        "tls": run_tls,
    }
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for load, senders in _loads(args).items():
        report[load] = {}
        for label, size in SIZES.items():
            body = os.urandom(size)
            rounds: dict[str, list[Result]] = {name: [] for name in variants}
            for _ in range(args.rounds):  # interleaved: each variant sees the same weather
                for name, run in variants.items():
                    rounds[name].append(await run(body, senders, args.seconds))
            row: dict[str, Any] = {}
            for name, results in rounds.items():
                best = max(results, key=lambda r: r.per_s)
                row[name] = {
                    "per_s": best.per_s,
                    "p50_ms": best.p50,
                    "p99_ms": best.p99,
                    "per_s_median": statistics.median(r.per_s for r in results),
                }
            row["vs_plaintext"] = row["tvdnet"]["per_s"] / row["plaintext"]["per_s"]
            row["vs_tls"] = row["tvdnet"]["per_s"] / row["tls"]["per_s"]
            row["p50_vs_tls"] = row["tvdnet"]["p50_ms"] / row["tls"]["p50_ms"]
            report[load][label] = row
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement")
    parser.add_argument("--senders", type=int, default=64, help="messages in flight")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "throughput.json",
        help="write the figures here (default: %(default)s)",
    )
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.UTC)
    report = trio.run(measure, args)
    print(f"request/ack over loopback, best of {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'load':>24} {'body':>6} {'variant':>10} {'msg/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for load, rows in report.items():
        for label, row in rows.items():
            for name in ("tvdnet", "plaintext", "tls"):
                r = row[name]
                figures = f"{r['per_s']:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                print(f"{load:>24} {label:>6} {name:>10} {figures}")
            print(
                f"{load:>24} {label:>6} {'ratios':>10}  tvdnet/plaintext "
                f"{row['vs_plaintext']:.2f}  tvdnet/tls {row['vs_tls']:.2f}  "
                f"p50 tvdnet/tls {row['p50_vs_tls']:.2f}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"date": started.isoformat(timespec="seconds"), "seconds": args.seconds,
             "rounds": args.rounds, "loads": report},
            indent=2,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
