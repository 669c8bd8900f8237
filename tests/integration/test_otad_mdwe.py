"""otad under W^X (the unit's MemoryDenyWriteExecute=yes), measured rather than assumed.

libffi closures (cffi) need writable+executable memory, and cryptography uses cffi and Rust, so
the option is a known risk for Python services. ``mdwe_exec.py`` sets ``PR_SET_MDWE`` (the
kernel mechanism behind the option) and execs otad; the test first proves that the rule holds
in an exec'ed child (an anonymous W+X mapping is refused), then runs, under it, otad with
uvloop, TLS to the broker with certificate verification, image signature checks on import, a
whole distribution to CHs, and signed activation commands (otad's activation key) confirmed by
every CH.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, assert_clean_log, otactl, otactl_json, otad_config
from test_otad_activation import HAN_ACCELERATION, activation_setup, wait_devices
from tlskit import tls_listener_config

from loadtest.broker import MosquittoBroker, free_port
from loadtest.release import make_release
from loadtest.runner import HubFleet
from otad.events import HubOnline, TransferHeld
from protocol.release.manifest import DeviceType

pytestmark = [pytest.mark.broker, pytest.mark.slow]

LAUNCHER = Path(__file__).with_name("mdwe_exec.py")
HUBS = 5

WX_PROBE = """
import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
address = libc.mmap(None, 4096, rwx, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
print("refused" if address in (None, ctypes.c_void_p(-1).value) else "mapped",
      os.strerror(ctypes.get_errno()), libc.prctl(66, 0, 0, 0, 0))
"""


def mdwe_available() -> bool:
    probe = subprocess.run(
        [sys.executable, str(LAUNCHER), sys.executable, "-c", "pass"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def test_the_launcher_really_denies_write_execute_after_exec() -> None:
    if not mdwe_available():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    plain = subprocess.run(
        [sys.executable, "-c", WX_PROBE], capture_output=True, text=True, check=True
    )
    assert plain.stdout.startswith("mapped"), plain.stdout
    under = subprocess.run(
        [sys.executable, str(LAUNCHER), sys.executable, "-c", WX_PROBE],
        capture_output=True,
        text=True,
        check=True,
    )
    assert under.stdout.split()[0] == "refused", under.stdout
    assert under.stdout.split()[-1] == "1", under.stdout  # PR_GET_MDWE: REFUSE_EXEC_GAIN


@pytest.mark.timeout(240)
async def test_a_whole_distribution_with_activation_over_tls_under_mdwe(
    tmp_path: Path, mqtt_library: str
) -> None:
    if not mdwe_available():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    tls_port = free_port()
    tls_lines, ca = tls_listener_config(tmp_path / "pki", tls_port)
    # plaintext for the CHs, the monitor and otactl; TLS (second listener) for otad
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", extra_config=tls_lines)
    broker.start()
    otad_side = MosquittoBroker(port=tls_port, workdir=tmp_path / "unused")  # its address only
    version = 0x0102_0000
    release = make_release(
        tmp_path / "release", firmware_bytes=64 * 1024, device_type=DeviceType.CH, version=version
    )
    act = activation_setup(broker, tmp_path, HUBS, device_keys=False, response_timeout_s=2.0,
                           read_back_backoff_s=1.0)  # fmt: skip
    config = act.config + otad_config(broker={"tls_ca": str(ca.cert), "library": mqtt_library})
    monitor = await Monitor().start(broker)
    otad = Otad(
        otad_side,
        tmp_path / "otad",
        release.trust_dir,
        library=mqtt_library,
        config=config,
        wrapper=(sys.executable, str(LAUNCHER)),
    )
    otad.start()
    try:
        await monitor.wait_online(otad)
        async with HubFleet(
            broker=(broker.host, broker.port),
            state_dir=tmp_path / "hubs",
            count=HUBS,
            trust_dir=release.trust_dir,
            activation_trust_dir=act.trust,
            han_acceleration=HAN_ACCELERATION,
            procs=1,
        ):
            await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == HUBS)
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            otactl_json(broker, "distribute", release.sha256, "--all-matching")
            await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) == HUBS, 60)
            await wait_devices(
                broker,
                lambda rs: (
                    len(rs) == HUBS
                    and all(r["state"] in ("held_by_ch", "held_by_device") for r in rs)
                ),
                30,
                release.sha256,
            )
            assert otactl(broker, "activate", release.sha256, "--all-held").returncode == 0
            rows = await wait_devices(
                broker,
                lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
                90,
                release.sha256,
            )
        assert [r["state"] for r in rows] == ["confirmed"] * HUBS
        held = monitor.of_kind(TransferHeld)
        assert all(e.sha256 == release.sha256 and e.matches for e in held)
        assert otad.alive
        assert otad.terminate() == 0
        assert_clean_log(otad)
        # otad's connection was the TLS one
        assert f"{broker.host}:{tls_port}" in otad.log()
    finally:
        otad.stop_quietly()
        await monitor.close()
        broker.stop()
