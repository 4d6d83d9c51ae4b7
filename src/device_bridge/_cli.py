"""The `tvdnet-bridge` command: provision, run, status, reload (docs/bridge.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trio

from tvdnet.control import answers, control_request
from tvdnet.core.errors import single_error

from . import __version__
from ._config import TvdConfig, load_config
from ._control import default_control_path, serve_control
from ._daemon import Bridge, open_bridge
from ._iso import DEFAULT_ISO_DIR
from ._keystore import ENCRYPTED, Keystore, check_scrypt_n
from ._log import emit, logger
from ._metrics import start_metrics
from ._passphrase import read_passphrase
from ._provision import check_targets, keystore_paths, provision
from .constants import KEYSTORE_SCRYPT_N
from .errors import BridgeError, ControlError, TvdnetError

# Tests only: a cheaper scrypt, recorded in the file's kdf parameters (never for real use).
SCRYPT_N_ENV: Final = "TVDNET_KEYSTORE_SCRYPT_N"
# Bad input or environment (a file, a keystore, a socket): the node's convention too.
EXIT_ERROR: Final = 2


def _scrypt_n() -> int:
    text = os.environ.get(SCRYPT_N_ENV)
    if not text:
        return KEYSTORE_SCRYPT_N
    try:
        n = check_scrypt_n(int(text))
    except ValueError as exc:
        raise BridgeError(f"${SCRYPT_N_ENV}: {exc}") from None
    if n < KEYSTORE_SCRYPT_N:
        print(
            f"warning: ${SCRYPT_N_ENV}={n} weakens the keystore encryption (tests only)",
            file=sys.stderr,
        )
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvdnet-bridge", description="The device key-update daemon of a TVD."
    )
    parser.add_argument("--version", action="version", version=f"tvdnet-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("provision", help="create the keys of a TVD (G)")
    p.add_argument("tvd_file", type=Path, metavar="TVD.toml")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="write DIR/keystore.json (a TVD on several hosts: "
                   "DIR/keystore-HOST.json for each) and DIR/export/VM.keys")  # fmt: skip
    p.add_argument(
        "--keystore", type=Path, metavar="FILE",
        help="the keystore of a TVD on one host (default: DIR/keystore.json)",
    )  # fmt: skip
    p.add_argument(
        "--export", type=Path, metavar="DIR", help="the computer-key files (default: DIR/export)"
    )
    p.add_argument("--plaintext", action="store_true",
                   help="write the keystore unencrypted (demos only)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE")

    r = commands.add_parser("run", help="serve every VM's key channel")
    r.add_argument("--config", type=Path, required=True, metavar="TVD.toml")
    r.add_argument("--keystore", type=Path, required=True, metavar="FILE")
    r.add_argument("--host", metavar="HOST",
                   help="the host whose members to serve (the keystore's)")  # fmt: skip
    r.add_argument("--passphrase-file", type=Path, metavar="FILE")
    r.add_argument("--control", type=Path, metavar="PATH",
                   help=f"the control socket (default: {default_control_path()})")  # fmt: skip
    r.add_argument("--metrics", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT")  # fmt: skip
    r.add_argument("--allow-dev-transports", action="store_true",
                   help="allow TCP and Unix sockets other local processes can reach")  # fmt: skip
    r.add_argument("--iso-dir", type=Path, default=DEFAULT_ISO_DIR, metavar="DIR",
                   help=f"tmpfs directory for approach-I images ({DEFAULT_ISO_DIR})")  # fmt: skip
    r.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    for name, text in (
        ("status", "show each VM's key-update state"),
        ("reload", "re-read the TVD file"),
    ):
        c = commands.add_parser(name, help=text)
        c.add_argument("--control", type=Path, metavar="PATH")
        if name == "status":
            c.add_argument("--json", action="store_true", help="print the raw JSON")

    m = commands.add_parser(
        "move-out", help="seal a VM's device keys for the host it moves to (SPEC §6)"
    )
    m.add_argument("vm", metavar="VM")
    m.add_argument("--to", required=True, metavar="HOST", help="the host the VM moves to")
    m.add_argument("--bundle", type=Path, required=True, metavar="FILE",
                   help="write the bundle here (mode 0600, never over a file)")  # fmt: skip
    m.add_argument("--control", type=Path, metavar="PATH")
    i = commands.add_parser("move-in", help="take in a VM's bundle on the host it moves to")
    i.add_argument("bundle", type=Path, metavar="FILE")
    i.add_argument("--control", type=Path, metavar="PATH")
    return parser


# --------------------------------------------------------------------------- provision


def _provision(args: argparse.Namespace) -> int:
    config = load_config(args.tvd_file)
    keystores: Path | dict[str, Path] = args.keystore or keystore_paths(config, args.out)
    export = args.export or args.out / "export"
    check_targets(config, keystores, export, force=args.force)  # before asking for a passphrase
    if args.plaintext:
        print(
            "WARNING: --plaintext: the keystore will hold the device keys UNENCRYPTED. "
            "Use this for demos only (SPEC §6).",
            file=sys.stderr,
        )
        passphrase = None
    else:
        passphrase = read_passphrase(confirm=True, file=args.passphrase_file)
    try:
        result = provision(
            config,
            keystores,
            export,
            passphrase=passphrase,
            force=args.force,
            scrypt_n=_scrypt_n(),
        )
    finally:
        if passphrase is not None:
            passphrase[:] = bytes(len(passphrase))
    schedule = result.schedule
    print(
        f"Provisioned TVD {config.tvd!r}: {len(config.members)} members, {result.pairs} pairs; "
        f"{schedule.periods} periods of {schedule.period_s:g} s from epoch {schedule.epoch:.3f}."
    )
    kind = "encrypted" if passphrase is not None else "PLAINTEXT, demo only"
    if len(result.keystores) == 1:
        print(f"Keystore (device keys dev_{result.t0} only, {kind}): {result.keystore}")
    else:
        print(f"Keystores, one per host (device keys dev_{result.t0} only, {kind}):")
        for host, path in result.keystores.items():
            pairs = result.pairs_per_host[host]
            print(f"  {path}  -> host {host!r}: {pairs} pairs; `tvdnet-bridge run --host {host}`")
        print("Move each to its host; keep no other copy (SPEC §1, §6).")
    print(f"Computer-key files, one per VM, in {export}:")
    for vm, path in result.exports.items():
        print(f"  {path}  -> move into VM {vm!r} (mode 0600), for its node's key_file")
    print(
        "Then delete them from this host (for example: shred -u "
        f"{export}/*.keys): the bridge must never hold a computer key (SPEC §1). "
        "Keep no backup of the keystore either."
    )
    return 0


# --------------------------------------------------------------------------- run


def _setup_logging(level: str) -> None:
    """One handler on the stderr of this call (a `run` in a process that ran one before,
    as tests do, must not keep writing to an earlier, closed stream)."""
    for old in [h for h in logger.handlers if getattr(h, "_tvdnet_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._tvdnet_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def _load_keystore(path: Path, passphrase_file: Path | None) -> Keystore:
    header = Keystore.read_header(path)
    passphrase = None
    if header["encryption"] == ENCRYPTED:
        passphrase = read_passphrase(confirm=False, file=passphrase_file)
    else:
        emit(logging.WARNING, "plaintext-keystore", path=path, note="demo only (SPEC §6)")
    try:
        keystore = Keystore.load(path, passphrase, scrypt_n=_scrypt_n())
    except BaseException:
        if passphrase is not None:
            passphrase[:] = bytes(len(passphrase))
        raise
    return keystore


async def _handle_signals(bridge: Bridge, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    await bridge.reload()
                except TvdnetError as exc:
                    emit(logging.ERROR, "reload-failed", why=str(exc))
            else:
                emit(logging.INFO, "stopping", signal=signal.Signals(signum).name)
                cancel.cancel()
                return


async def _serve(args: argparse.Namespace, config: TvdConfig, keystore: Keystore) -> None:
    control = args.control or default_control_path()
    if await answers(control):
        # Before the bridge starts anything: a second bridge must not serve (or rewrite
        # its keystore) while it cannot be told anything.
        raise ControlError(f"another process answers on {control}; is a bridge already running?")
    async with open_bridge(
        config,
        keystore.device_keys,
        keystore=keystore,
        host=args.host,
        allow_dev_transports=args.allow_dev_transports,
        iso_dir=args.iso_dir,
    ) as bridge:
        metrics = start_metrics(bridge, args.metrics) if args.metrics is not None else None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, bridge, nursery.cancel_scope)
                await nursery.start(serve_control, bridge, control)
        finally:
            if metrics is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(metrics.close)


def _run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    config = load_config(args.config)
    keystore = _load_keystore(args.keystore, args.passphrase_file)
    try:
        keystore.lock()
        config.check_schedule(keystore.schedule)
        if config.tvd != keystore.tvd:
            raise config.error("tvd", f"is {config.tvd!r}; the keystore is of {keystore.tvd!r}")
        trio.run(_serve, args, config, keystore)
    finally:
        keystore.device_keys.erase()
        keystore.close()
    return 0


# --------------------------------------------------------------------------- status, reload


def _age(value: Any) -> str:
    return f"{value * 1000:.1f}" if isinstance(value, int | float) else "-"


def print_status(status: dict[str, Any]) -> None:
    period = status.get("period")
    print(
        f"TVD {status['tvd']} on host {status.get('host', '-')}: period "
        f"{period if period is not None else '-'} of "
        f"{status['periods']} ({status['period_s']:g} s); keystore at period "
        f"{status.get('keystore_period') or '-'}"
        + (f", {status['keystore_errors']} write errors" if status.get("keystore_errors") else "")
    )
    header = (
        "VM",
        "CONNECTED",
        "STATE",
        "ACKED",
        "LAG",
        "RESENDS",
        "STUCK",
        "LATENCY_MS",
        "CHANNEL",
    )
    rows = [header]
    for vm in status["vms"]:
        rows.append(
            (
                vm["vm"],
                "yes" if vm["connected"] else "no",
                vm["state"],
                str(vm["acked"] or "-"),
                str(vm["lag"]),
                str(vm["resends"]),
                str(vm["stuck"]),
                _age(vm["last_latency"]),
                vm["channel"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for vm, hosts in sorted((status.get("pairs_elsewhere") or {}).items()):
        where = "; ".join(f"{', '.join(peers)} on {host}" for host, peers in sorted(hosts.items()))
        print(f"{vm}: pairs with {where} (their device keys are on both hosts)")
    for vm in status.get("suspended") or []:
        print(f"{vm}: suspended (not served, keys kept; `suspended = false` and reload to resume)")
    updates = status.get("key_updates") or []
    if updates:
        last = updates[-1]
        done = last["all_acked_ms"]
        print(
            f"Update of period {last['t']}: acked by {last['acked']} of the {last['vms']} VMs "
            "connected at its start; "
            + (f"all {done:.1f} ms after the start" if done is not None else "waiting")
        )


def _control(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    request: dict[str, Any] = {"command": args.command}
    if args.command == "move-out":
        request.update(vm=args.vm, to=args.to, bundle=str(args.bundle.absolute()))
    elif args.command == "move-in":
        request.update(bundle=str(args.bundle.absolute()))
    answer = trio.run(control_request, path, request)
    if not answer.get("ok"):
        print(f"tvdnet-bridge {args.command}: {answer.get('error', 'failed')}", file=sys.stderr)
        return EXIT_ERROR
    if args.command in ("move-out", "move-in"):
        move = answer["move"]
        if args.command == "move-out":
            print(
                f"{move['vm']}: {move['pairs']} pairs sealed for host {move['to']} in period "
                f"{move['t']} -> {args.bundle}. Take it in on {move['to']} within this period "
                f"(`tvdnet-bridge move-in`), migrate the VM, then set its host in this host's "
                "TVD file and `tvdnet-bridge reload` here to erase its keys."
            )
        else:
            print(
                f"{move['vm']}: taken in from host {move['from']} (period {move['t']}, "
                f"{move['pairs']} pairs, {move['adopted']} new here); served on this host now. "
                f"Delete the bundle file."
            )
    elif args.command == "reload":
        result = answer["reload"]
        changes = [
            f"{c['vm']} {c['what']} {c['before']} -> {c['after']}"
            for c in result.get("changes", [])
        ]
        print(
            "reloaded: removed "
            + (", ".join(result["removed"]) or "none")
            + "; changed "
            + ("; ".join(changes) or "nothing")
            + f"; {len(result['told'])} VMs told the new members"
            + (
                f"; moved away (keys erased here): {', '.join(result['moved_away'])}"
                if result.get("moved_away")
                else ""
            )
            + (
                f"; suspended (keys kept): {', '.join(result['suspended'])}"
                if result.get("suspended")
                else ""
            )
            + (f"; resumed: {', '.join(result['resumed'])}" if result.get("resumed") else "")
        )
    elif args.json:
        print(json.dumps(answer["status"], indent=1))
    else:
        print_status(answer["status"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "provision": _provision,
        "run": _run,
        "status": _control,
        "reload": _control,
        "move-out": _control,
        "move-in": _control,
    }
    try:
        return handlers[args.command](args)
    except (TvdnetError, BaseExceptionGroup) as exc:
        error = single_error(exc)
        if error is None:
            raise
        print(f"tvdnet-bridge {args.command}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"tvdnet-bridge {args.command}:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
