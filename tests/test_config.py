"""NodeConfig from TOML: what it accepts, and what it refuses with the file and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvdnet import ConfigError, KeyChannelSpec, NodeConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vm-a.toml"
    path.write_text(text)
    return path


def test_a_full_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'key_file = "keys/vm-a.keys"\nlisten = "0.0.0.0:7001"\n'
        'key_channel = "tty:/dev/pts/4"\ncontrol_socket = "vm-a.control"\n'
        "skew_allowance = 1.5\nsend_timeout = 10\nmax_unauthenticated = 8\ninbox_size = 100\n",
    )
    config = NodeConfig.load(path)
    assert config.key_file == tmp_path / "keys/vm-a.keys"
    assert config.key_channel == KeyChannelSpec("tty", "/dev/pts/4")
    assert config.control_socket == tmp_path / "vm-a.control"
    assert (config.skew_allowance, config.send_timeout) == (1.5, 10)
    assert (config.max_unauthenticated, config.inbox_size) == (8, 100)


def test_defaults(tmp_path: Path) -> None:
    config = NodeConfig.load(write(tmp_path, 'key_file = "k"\nlisten = "127.0.0.1:7001"\n'))
    assert config.key_channel == KeyChannelSpec("virtio", "org.tvdnet.keys.0")
    assert config.skew_allowance == 2.0
    assert config.control_socket is None


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('listen = "127.0.0.1:1"\n', "key_file", "required"),
        ('key_file = "k"\n', "listen", "required"),
        ('key_file = "k"\nlisten = "nohost"\n', "listen", "host:port"),
        ('key_file = "k"\nlisten = "h:1"\nkey_channel = "usb:3"\n', "key_channel", "one of"),
        ('key_file = "k"\nlisten = "h:1"\nkey_channel = "fd:x"\n', "key_channel", "descriptor"),
        ('key_file = "k"\nlisten = "h:1"\nkey_channel = "tcp:nope"\n', "key_channel", "host:port"),
        ('key_file = "k"\nlisten = "h:1"\nsend_timeout = -1\n', "send_timeout", ">= 0"),
        ('key_file = "k"\nlisten = "h:1"\ninbox_size = 0\n', "inbox_size", ">= 1"),
        ('key_file = "k"\nlisten = "h:1"\nlisten_port = 3\n', "listen_port", "unknown key"),
        ('key_file = "k"\nlisten = \n', "", "TOML syntax"),
        # Absurd values (issue 18): bounds, and NUL bytes in paths.
        (
            'key_file = "k"\nlisten = "h:1"\nskew_allowance = 1e9\n',
            "skew_allowance",
            "1e+09 s is over the 600 s this setting allows",
        ),
        (
            'key_file = "k"\nlisten = "h:1"\nsend_timeout = 1e12\n',
            "send_timeout",
            "over the 86400 s",
        ),
        ('key_file = "k\\u0000x"\nlisten = "h:1"\n', "key_file", "NUL byte"),
        (
            'key_file = "k"\nlisten = "h:1"\ncontrol_socket = "c\\u0000"\n',
            "control_socket",
            "NUL byte",
        ),
        (
            'key_file = "k"\nlisten = "h:1"\nkey_channel = "unix:a\\u0000b"\n',
            "key_channel",
            "NUL byte",
        ),
    ],
)
def test_bad_configs_name_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        NodeConfig.load(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(path) in str(caught.value)
