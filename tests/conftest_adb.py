"""Pytest fixtures for the ADB test device (a fake phone on loopback; see tests/adb_test_device/).

Import from tests/conftest.py with ``from conftest_adb import *``. Fixtures:

- ``adb_key``: a fresh RSA key pair at ``<tmp home>/.android/adbkey`` (mode 0600) and ``adbkey.pub``,
  made with adb-shell's keygen. ``.signer()`` gives an adb-shell signer; ``.env()`` an environment
  for subprocesses (HOME etc. pointing at the temp home). The process's own HOME is left alone.
- ``adb_home``: the same key, with HOME (and ANDROID_SDK_HOME/ANDROID_USER_HOME) monkeypatched to
  the temp home for code that looks for ``~/.android/adbkey`` itself.
- ``adb_test_device_factory``: ``make(**AdbTestDevice kwargs)`` -> a started device with ``adb_key``
  authorised (unless ``authorized_keys`` is given); every device is stopped at teardown.
- ``adb_test_device``: one started device; a handle with ``host``, ``port``, ``serial``, ``uri``
  (``adb-tcp:127.0.0.1:PORT``), ``sandbox`` (Path), ``key``, ``device`` (the AdbTestDevice),
  ``install_runner()``, ``phone_path()``, ``connect()`` (a connected adb-shell client).
- ``google_adb``: Google's ``adb`` client with a private server port and the temp home; skips when
  ``/usr/bin/adb`` is absent; ``adb kill-server`` always runs at teardown.
- ``adb_server``: Google's adb server itself (``adb -P PORT nodaemon server`` on a free loopback
  port, the temp home's key), as a child process that is always stopped at teardown;
  ``.attach(handle)`` does ``adb connect`` to a test phone and waits until it is ``device``,
  ``.address`` is the ``ServerAddress`` for amc-mobile.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    from adb_test_device import AdbTestDevice
except ImportError:  # tests/ imported as a package
    from tests.adb_test_device import AdbTestDevice

__all__ = [
    "AdbKey",
    "AdbTestDeviceHandle",
    "GoogleAdb",
    "RUNNER_PHONE_PATH",
    "adb_home",
    "AdbServerProcess",
    "adb_key",
    "adb_server",
    "adb_test_device",
    "adb_test_device_factory",
    "google_adb",
    "make_adb_key",
]

REPO = Path(__file__).resolve().parent.parent
HOST_RUNNER = REPO / "build" / "host" / "et_bench"
RUNNER_PHONE_PATH = "/data/local/tmp/amc_mobile/et_bench"
GOOGLE_ADB = "/usr/bin/adb"


@dataclass
class AdbKey:
    home: Path  # the temp HOME; the key is home/.android/adbkey
    path: Path  # private key (PEM, PKCS#8), mode 0600
    pub_path: Path

    @property
    def public_key(self) -> str:
        """adbkey.pub contents: base64 Android RSA public key + ' user@host'."""
        return self.pub_path.read_text()

    def signer(self):
        from adb_shell.auth.sign_pythonrsa import PythonRSASigner

        return PythonRSASigner.FromRSAKeyPath(str(self.path))

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        for var in ("ANDROID_SERIAL", "ADB_SERVER_SOCKET", "ANDROID_ADB_SERVER_PORT", "ADB_VENDOR_KEYS"):
            env.pop(var, None)
        env.update(HOME=str(self.home), ANDROID_SDK_HOME=str(self.home), ANDROID_USER_HOME=str(self.home / ".android"))
        return env


def make_adb_key(home: Path) -> AdbKey:
    from adb_shell.auth.keygen import keygen

    android = Path(home) / ".android"
    android.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = android / "adbkey"
    keygen(str(path))
    os.chmod(path, 0o600)
    return AdbKey(home=Path(home), path=path, pub_path=Path(str(path) + ".pub"))


@pytest.fixture
def adb_key(tmp_path_factory) -> AdbKey:
    return make_adb_key(tmp_path_factory.mktemp("adbhome"))


@pytest.fixture
def adb_home(adb_key, monkeypatch) -> AdbKey:
    monkeypatch.setenv("HOME", str(adb_key.home))
    monkeypatch.setenv("ANDROID_SDK_HOME", str(adb_key.home))
    monkeypatch.setenv("ANDROID_USER_HOME", str(adb_key.home / ".android"))
    return adb_key


@dataclass
class AdbTestDeviceHandle:
    device: AdbTestDevice
    key: AdbKey
    host: str = ""
    port: int = 0
    sandbox: Path = field(default_factory=Path)
    _clients: list = field(default_factory=list)

    def __post_init__(self):
        self.host = self.device.host
        self.port = self.device.port
        self.sandbox = Path(self.device.sandbox_dir)

    @property
    def serial(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"adb-tcp:{self.host}:{self.port}"

    def phone_path(self, phone_path: str) -> Path:
        """Where a phone path lives on the host: /data/local/tmp/x -> <sandbox>/data/local/tmp/x."""
        return Path(self.device.phone_path(phone_path))

    def install_runner(self, source: str | os.PathLike | None = None, dest: str = RUNNER_PHONE_PATH) -> Path:
        """Copy a runner (default: the host-built build/host/et_bench) to `dest` on the phone, mode 0755.

        The bridge normally pushes the runner itself; this is for tests that start with it deployed.
        """
        src = Path(source) if source is not None else HOST_RUNNER
        if not src.is_file():
            raise FileNotFoundError(f"no runner at {src}: build it with `make runner`")
        target = self.phone_path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        os.chmod(target, 0o755)
        return target

    def connect(self, timeout_s: float = 5.0):
        """A connected adb-shell AdbDeviceTcp (closed at teardown)."""
        from adb_shell.adb_device import AdbDeviceTcp

        client = AdbDeviceTcp(self.host, self.port, default_transport_timeout_s=timeout_s)
        client.connect(rsa_keys=[self.key.signer()], auth_timeout_s=timeout_s, read_timeout_s=timeout_s)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:
                pass
        self._clients.clear()

    def __getattr__(self, name):  # set_faults, set_prop, commands, ... straight from the device
        if name.startswith("_") or name in ("device", "key"):
            raise AttributeError(name)
        return getattr(self.device, name)


@pytest.fixture
def adb_test_device_factory(adb_key, tmp_path_factory):
    handles: list[AdbTestDeviceHandle] = []

    def make(**kwargs) -> AdbTestDeviceHandle:
        kwargs.setdefault("authorized_keys", [adb_key.public_key])
        sandbox = kwargs.pop("sandbox_dir", None) or tmp_path_factory.mktemp("phone")
        device = AdbTestDevice(sandbox, **kwargs)
        device.start()
        handle = AdbTestDeviceHandle(device=device, key=adb_key)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close_clients()
        handle.device.stop()


@pytest.fixture
def adb_test_device(adb_test_device_factory) -> AdbTestDeviceHandle:
    return adb_test_device_factory()


class GoogleAdb:
    """Google's adb client against a private adb server (own port, own HOME, own log dir)."""

    def __init__(self, key: AdbKey, workdir: Path, exe: str = GOOGLE_ADB):
        self.exe = exe
        self.key = key
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.server_port = s.getsockname()[1]
        env = key.env()
        env["ANDROID_ADB_SERVER_PORT"] = str(self.server_port)
        env["TMPDIR"] = str(workdir)  # the server's log: $TMPDIR/adb.$UID.log
        self.env = env
        self.log_path = Path(workdir) / f"adb.{os.getuid()}.log"

    def run(self, *args: str, timeout: float = 30, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("capture_output", True)
        proc = subprocess.run([self.exe, *args], env=self.env, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"adb {' '.join(args)} -> {proc.returncode}\nstdout: {proc.stdout!r}\n"
                                 f"stderr: {proc.stderr!r}\n{self.log_tail()}")
        return proc

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "adb server log:\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no adb server log)"

    def kill_server(self) -> None:
        try:
            self.run("kill-server", timeout=15)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def google_adb(adb_key, tmp_path_factory):
    if not os.path.exists(GOOGLE_ADB):
        pytest.skip(f"Google's adb client is not installed at {GOOGLE_ADB} (apt-get install adb)")
    adb = GoogleAdb(adb_key, tmp_path_factory.mktemp("adbserver"))
    try:
        yield adb
    finally:
        adb.kill_server()


class AdbServerProcess(GoogleAdb):
    """Google's adb server as our child (`nodaemon`), so that a test can also kill it outright."""

    def __init__(self, key: AdbKey, workdir: Path, exe: str = GOOGLE_ADB):
        super().__init__(key, workdir, exe)
        self.log_path = Path(workdir) / "adb-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self):
        from device.adb.host_protocol import ServerAddress

        return ServerAddress("127.0.0.1", self.server_port, "URI")

    def start(self, timeout_s: float = 15.0) -> "AdbServerProcess":
        import time

        from device.adb.host_protocol import ServerUnreachable, server_version

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.exe, "-P", str(self.server_port), "nodaemon", "server"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                server_version(self.address, 1.0)
                return self
            except (ServerUnreachable, OSError, ValueError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"adb server did not start (rc {self.proc.poll()})\n{self.log_tail()}")
                time.sleep(0.05)

    def attach(self, handle: "AdbTestDeviceHandle", timeout_s: float = 20.0) -> str:
        """`adb connect` the test phone; its serial on the server once it is `device`."""
        import time

        from device.adb.host_protocol import list_devices

        out = self.run("connect", handle.serial, text=True, timeout=30)
        assert f"connected to {handle.serial}" in out.stdout, (out, self.log_tail())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(e.serial == handle.serial and e.state == "device" for e in list_devices(self.address)):
                return handle.serial
            time.sleep(0.05)
        raise AssertionError(f"{handle.serial} never became 'device': {list_devices(self.address)}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill_server()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def adb_server(adb_key, tmp_path_factory):
    if not os.path.exists(GOOGLE_ADB):
        pytest.skip(f"Google's adb server is not installed at {GOOGLE_ADB} (apt-get install adb)")
    server = AdbServerProcess(adb_key, tmp_path_factory.mktemp("adbserver"))
    try:
        yield server.start()
    finally:
        server.stop()
