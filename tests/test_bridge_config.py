"""The TVD file: what it accepts, and errors that name the file, the line and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_bridge._config import load_config
from device_bridge._transports import (
    CdromSwap,
    SerialLine,
    TcpConnect,
    TcpListen,
    UnixConnect,
    UnixListen,
    development_reason,
    parse_channel,
)
from device_bridge.errors import ConfigError
from helpers import REPO
from tvdnet.core.scheme import Schedule

GOOD = """\
tvd = "demo"
period_seconds = 30.0
periods = 100
[[members]]
id = "vm-a"
address = "127.0.0.1:7001"
channel = "unix:a.sock"
[[members]]
id = "vm-b"
address = "127.0.0.1:7002"
channel = "pty:/dev/pts/9"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tvd.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == path
    assert str(caught.value).startswith(str(path))
    return caught.value


def test_the_example_tvd_file_loads() -> None:
    config = load_config(REPO / "examples" / "tvd.toml")
    assert config.tvd == "demo"
    assert config.ids == ("vm-a", "vm-b", "vm-c")
    assert config.member("vm-a").channel == UnixConnect(Path("/run/tvdnet/vm-a.sock"))
    assert config.member("vm-c").channel == UnixListen(Path("/run/tvdnet/vm-c.sock"))
    assert config.epoch is None and config.pair_list() is None


def test_relative_socket_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.member("vm-a").channel == UnixConnect(tmp_path.resolve() / "a.sock")
    assert config.member("vm-b").channel == SerialLine("pty", Path("/dev/pts/9"))
    assert config.period_seconds == 30.0 and config.periods == 100


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, GOOD.replace('id = "vm-b"', 'id = "vm-b'))
    assert error.line == 9
    assert f"{tmp_path / 'tvd.toml'}:9: TOML syntax" in str(error)


@pytest.mark.parametrize(
    ("edit", "line", "key", "words"),
    [
        (("periods = 100", "periods = 100\ncolour = 3"), 4, "colour", "unknown key"),
        (('address = "127.0.0.1:7002"', 'adress = "127.0.0.1:7002"'), 10, "members[1].adress",
         "unknown key"),
        (('id = "vm-b"', 'id = "vm-a"'), 9, "members[1].id", "already members[0]"),
        (('id = "vm-b"', 'id = "vm b"'), 9, "members[1].id", "[A-Za-z0-9._-]"),
        (('id = "vm-b"', 'id = 7'), 9, "members[1].id", "must be a string"),
        (('channel = "pty:/dev/pts/9"', 'channel = "fifo:/x"'), 11, "members[1].channel",
         "unknown channel kind"),
        (('channel = "pty:/dev/pts/9"', 'channel = "tcp:10.0.0.5:9000"'), 11,
         "members[1].channel", "loopback"),
        (('channel = "pty:/dev/pts/9"', 'channel = "unix:a.sock"'), 11, "members[1].channel",
         "already the channel of members[0]"),
        (('channel = "pty:/dev/pts/9"', ""), 8, "members[1]", "'channel' is missing"),
        (('address = "127.0.0.1:7002"', 'address = "nowhere"'), 10, "members[1].address",
         "host:port"),
        (('address = "127.0.0.1:7002"', 'address = "127.0.0.1:7001"'), 10,
         "members[1].address", "already the address"),
        (("period_seconds = 30.0", "period_seconds = -1"), 2, "period_seconds", "> 0"),
        # Absurd periods (issue 18): provisioned, then ended at once or logged 1,000 lines/s.
        (("period_seconds = 30.0", "period_seconds = 1e-300"), 2, "period_seconds",
         "1e-300 s is outside 0.5 s to 3.16224e+07 s"),
        (("period_seconds = 30.0", "period_seconds = 0.001"), 2, "period_seconds", "outside"),
        (("period_seconds = 30.0", "period_seconds = 1e9"), 2, "period_seconds", "outside"),
        (('channel = "pty:/dev/pts/9"', 'channel = "unix:/run/a\\u0000b"'), 11,
         "members[1].channel", "NUL byte"),
        (("period_seconds = 30.0", 'period_seconds = "30"'), 2, "period_seconds", "number"),
        (("periods = 100", "periods = 1.5"), 3, "periods", "integer"),
        (('tvd = "demo"', 'tvd = "demo!"'), 1, "tvd", "[A-Za-z0-9._-]"),
        (("periods = 100", 'periods = 100\npairs = "star:vm-z"'), 4, "pairs", "star:HUB"),
        (('address = "127.0.0.1:7002"', 'address = "127.0.0.1:7002"\nsuspended = "yes"'), 11,
         "members[1].suspended", "true or false"),
    ],
)  # fmt: skip
def test_semantic_errors_name_the_line_and_key(
    tmp_path: Path, edit: tuple[str, str], line: int, key: str, words: str
) -> None:
    error = error_of(tmp_path, GOOD.replace(*edit))
    assert (error.line, error.key) == (line, key)
    assert f"tvd.toml:{line}: {key}: " in str(error)
    assert words in error.problem


def test_a_member_may_be_suspended(tmp_path: Path) -> None:
    text = GOOD.replace('"127.0.0.1:7002"', '"127.0.0.1:7002"\nsuspended = true')
    config = load_config(write(tmp_path, text))
    assert config.member("vm-b").suspended and not config.member("vm-a").suspended
    assert config.suspended == {"vm-b"}
    assert [m.id for m in config.served_on("local")] == ["vm-a"]
    assert [m.id for m in config.members_on("local")] == ["vm-a", "vm-b"]


def test_a_missing_top_level_key_is_named(tmp_path: Path) -> None:
    error = error_of(tmp_path, GOOD.replace("periods = 100\n", ""))
    assert error.key == "periods" and error.problem == "missing"


def test_one_member_is_not_a_tvd(tmp_path: Path) -> None:
    error = error_of(tmp_path, GOOD.split('[[members]]\nid = "vm-b"')[0])
    assert error.key == "members" and "at least two members" in error.problem
    assert error.line == 4


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tvd\.toml: cannot read it"):
        load_config(tmp_path / "tvd.toml")


def test_star_pairs() -> None:
    config = load_config(REPO / "examples" / "tvd.toml")
    star = type(config)(
        config.tvd, config.members, config.period_seconds, config.periods, pairs="star:vm-b"
    )
    assert star.pair_list() == [("vm-b", "vm-a"), ("vm-b", "vm-c")]


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("unix:/run/x.sock", UnixConnect(Path("/run/x.sock"))),
        ("unix-listen:/run/x.sock", UnixListen(Path("/run/x.sock"))),
        ("pty:/dev/pts/3", SerialLine("pty", Path("/dev/pts/3"))),
        ("serial:/dev/ttyS1", SerialLine("serial", Path("/dev/ttyS1"))),
        ("tcp:127.0.0.1:9001", TcpListen("127.0.0.1", 9001)),
        ("tcp-connect:[::1]:9001", TcpConnect("::1", 9001)),
        ("cdrom:/run/vm-a.qmp#cd1", CdromSwap(Path("/run/vm-a.qmp"), "cd1")),
        ("cdrom:/run/vm-a.qmp", CdromSwap(Path("/run/vm-a.qmp"), "cdrom0")),
    ],
)
def test_channel_spellings_round_trip(text: str, spec: object) -> None:
    assert parse_channel(text) == spec
    assert parse_channel(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["unix:", "pty:relative", "tcp:192.168.1.1:80", "tcp:localhost", "unix:/" + "x" * 120, "x"],
)
def test_bad_channels(text: str) -> None:
    with pytest.raises(ValueError):
        parse_channel(text)


def test_development_transports_are_recognised(tmp_path: Path) -> None:
    assert development_reason(TcpListen("127.0.0.1", 9)) is not None
    assert development_reason(TcpConnect("127.0.0.1", 9)) is not None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert development_reason(UnixConnect(private / "a.sock")) is None
    assert development_reason(UnixListen(private / "a.sock")) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert "writable by others" in (development_reason(UnixListen(shared / "a.sock")) or "")
    loose = private / "loose.sock"
    loose.touch()
    os.chmod(loose, 0o666)
    assert "any local process" in (development_reason(UnixConnect(loose)) or "")
    assert development_reason(SerialLine("pty", Path("/dev/pts/0"))) is None


def test_a_schedule_other_than_the_keystores_is_refused(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    config.check_schedule(Schedule(5.0, 30.0, 100))  # no epoch in the file: any epoch
    with pytest.raises(ConfigError) as caught:
        config.check_schedule(Schedule(5.0, 60.0, 100))
    assert caught.value.line == 2 and caught.value.key == "period_seconds"
    assert "provision again" in str(caught.value)
