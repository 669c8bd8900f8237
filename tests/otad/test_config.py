"""TOML configuration: defaults, strict validation naming the key, CLI overrides."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from otad.config import (
    MAX_WINDOW,
    BrokerConfig,
    Config,
    ConfigError,
    StoreConfig,
    TransferConfig,
    cli_overrides,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "systemd" / "otad.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "otad.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, {}, env={})
    assert config == Config()
    assert config.broker == BrokerConfig(host="localhost", port=1883, library="gmqtt")
    assert config.store == StoreConfig(
        state_dir=Path("/var/lib/otad"), flush_interval_ms=100, flush_batch=1000
    )
    assert config.store.flush_interval == 0.1
    t = config.transfer
    assert (t.window, MAX_WINDOW, t.global_inflight) == (8, 64, 4096)
    assert (t.segment_rate, t.qos_blocks) == (0.0, 0)
    assert config.events.progress_interval_s == 30.0
    assert config.log.level == "INFO"
    assert not config.broker.tls


@pytest.mark.parametrize("key", ["block_size", "max_window"])
def test_keys_nothing_read_are_gone_and_refused_by_name(tmp_path: Path, key: str) -> None:
    """transfer.block_size (a block's size is its signed manifest's) and transfer.max_window
    (the window never grows past transfer.window) were validated and documented, never read."""
    assert key not in {f.name for f in dataclasses.fields(TransferConfig)}
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(write(tmp_path, f"[transfer]\n{key} = 64\n"), {}, env={})
    assert info.value.key == f"transfer.{key}"
    assert (
        load_config(write(tmp_path, "[transfer]\nwindow = 64\n"), {}, env={}).transfer.window == 64
    )


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/otad-a:/var/lib/otad-b"}
    assert load_config(None, {}, env=env).store.state_dir == Path("/var/lib/otad-a")
    path = write(tmp_path, '[store]\nstate_dir = "/srv/otad"\n')
    assert load_config(path, {}, env=env).store.state_dir == Path("/srv/otad")  # file wins


def test_example_file_is_valid_and_lists_every_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    assert load_config(EXAMPLE, {}, env={}) == Config()  # everything commented out
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    parsed = tomllib.loads(uncommented)
    defaults = Config()
    optional = {"username", "password_file", "tls_ca", "tls_cert", "tls_key", "revoked_file",
                "key", "device_keys"}  # fmt: skip
    for section in dataclasses.fields(Config):
        table = parsed[section.name]
        section_defaults = getattr(defaults, section.name)
        names = {f.name for f in dataclasses.fields(section_defaults)}
        assert set(table) == names, section.name
        for name in names - optional:
            default = getattr(section_defaults, name)
            assert type(default)(table[name]) == default, f"{section.name}.{name}"


def test_file_values_are_read_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
host = "broker.example"
port = 8883
username = "otad"
password_file = "secrets/password"
tls_ca = "/etc/ca.pem"
library = "aiomqtt"
[transfer]
window = 16
segment_rate = 50
rto_min = 1
[log]
level = "debug"
""",
    )
    config = load_config(path, {}, env={})
    assert config.broker.host == "broker.example"
    assert config.broker.port == 8883
    assert config.broker.password_file == tmp_path / "secrets" / "password"
    assert config.broker.tls_ca == Path("/etc/ca.pem")
    assert config.broker.tls
    assert config.broker.library == "aiomqtt"
    assert config.transfer.window == 16
    assert config.transfer.segment_rate == 50.0
    assert isinstance(config.transfer.segment_rate, float)
    assert config.transfer.rto_min == 1.0
    assert config.log.level == "DEBUG"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[broker]\nhost = "a"\nport = 1\n[store]\nstate_dir = "/x"\n[trust]\ndir = "/t"\n',
    )
    flags = cli_overrides(broker="b.example:1884", state_dir="rel/state", trust="/trust")
    config = load_config(path, flags, env={"STATE_DIRECTORY": "/env"})
    assert (config.broker.host, config.broker.port) == ("b.example", 1884)
    assert config.store.state_dir == Path.cwd() / "rel" / "state"
    assert config.trust.dir == Path("/trust")
    only_host = load_config(path, cli_overrides(broker="c"), env={})
    assert (only_host.broker.host, only_host.broker.port) == ("c", 1)
    v6 = load_config(None, cli_overrides(broker="[::1]:1999"), env={})
    assert (v6.broker.host, v6.broker.port) == ("::1", 1999)


@pytest.mark.parametrize("bad", ["", "host:", "a:b:c", "[::1", "host:port"])
def test_bad_broker_flag_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli_overrides(broker=bad)
    assert info.value.key == "--broker"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[broker]\nhost = ""', "broker.host"),
        ("[broker]\nport = 0", "broker.port"),
        ("[broker]\nport = 65536", "broker.port"),
        ('[broker]\nport = "1883"', "broker.port"),
        ("[broker]\nport = true", "broker.port"),
        ('[broker]\nclient_id = "otad/1"', "broker.client_id"),
        ('[broker]\nclient_id = "#"', "broker.client_id"),
        ('[broker]\nusername = "a+b"', "broker.username"),
        ('[broker]\npassword_file = "/p"', "broker.password_file"),
        ('[broker]\ntls_cert = "/c"', "broker.tls_key"),
        ('[broker]\ntls_key = "/k"', "broker.tls_cert"),
        ('[broker]\ntls_ca = ""', "broker.tls_ca"),
        ("[broker]\nkeepalive = 0", "broker.keepalive"),
        ('[broker]\nlibrary = "paho"', "broker.library"),
        ("[store]\nflush_interval_ms = 0", "store.flush_interval_ms"),
        ("[store]\nflush_interval_ms = 1.5", "store.flush_interval_ms"),
        ("[store]\nflush_batch = 0", "store.flush_batch"),
        ("[store]\nstate_dir = 5", "store.state_dir"),
        ("[trust]\ndir = []", "trust.dir"),
        ("[trust]\nrevoked_file = 1", "trust.revoked_file"),
        ("[transfer]\nblock_size = 8", "transfer.block_size"),
        ("[transfer]\nblock_size = 70000", "transfer.block_size"),
        ("[transfer]\nwindow = 0", "transfer.window"),
        ("[transfer]\nwindow = 65", "transfer.window"),
        ("[transfer]\nmax_window = 0", "transfer.max_window"),
        ("[transfer]\nglobal_inflight = 4", "transfer.global_inflight"),
        ("[transfer]\nsegment_rate = -1", "transfer.segment_rate"),
        ("[transfer]\nsegment_rate = inf", "transfer.segment_rate"),
        ("[transfer]\nqos_blocks = 2", "transfer.qos_blocks"),
        ("[transfer]\nrto_min = 0", "transfer.rto_min"),
        ("[transfer]\nrto_min = 2.0\nrto_max = 1.0", "transfer.rto_max"),
        ("[transfer]\nmax_rto_without_progress = 0", "transfer.max_rto_without_progress"),
        ("[events]\nprogress_interval_s = 0", "events.progress_interval_s"),
        ('[events]\ntopic_prefix = "ota/+/events"', "events.topic_prefix"),
        ('[events]\ntopic_prefix = "ota//events"', "events.topic_prefix"),
        ('[events]\ntopic_prefix = "/ota"', "events.topic_prefix"),
        ('[log]\nlevel = "LOUD"', "log.level"),
        ('[brokr]\nhost = "x"', "brokr"),
        ('[broker]\nhots = "x"', "broker.hots"),
        ("broker = 1", "broker"),
        ("top_level = 1", "top_level"),
    ],
)
def test_every_validation_error_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, env={})
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"broker.port": 0}, "broker.port"),
        ({"broker.hots": "x"}, "broker.hots"),
        ({"nosuch.key": 1}, "nosuch.key"),
        ({"broker": "x"}, "broker"),
        ({"transfer.window": 100}, "transfer.window"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, env={})
    assert info.value.key == key


def test_unreadable_or_malformed_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(missing, {}, env={})
    assert info.value.key == str(missing)
    broken = write(tmp_path, "[broker\nhost = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(broken, {}, env={})
    assert info.value.key == str(broken)


def test_config_is_frozen() -> None:
    config = load_config(None, {}, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.broker.port = 1  # type: ignore[misc]


def test_spec_states_the_daemons_momentum_default() -> None:
    import protocol

    spec = (Path(protocol.__file__).parent / "SPEC.md").read_text(encoding="utf-8")
    section = spec[spec.index("### 7.12") : spec.index("## 8.")]
    stated = re.search(
        r"`transfer\.max_rto_without_progress`.*?\*\*default (\d+)\*\*", section, re.S
    )
    assert stated is not None
    assert int(stated[1]) == TransferConfig().max_rto_without_progress
