"""`adb:SERIAL` / `adb-tcp:HOST:PORT` / `adb-server:HOST:PORT/SERIAL`: time candidates on an Android
phone with ExecuTorch + XNNPACK.

A batch (`measure`, or `measure_pte` for a `.pte` lowered elsewhere) costs, on the phone:

1. thermal guard: snapshot governors/frequencies/temperatures; wait while the CPU is too hot;
2. ONE push of the multi-method `.pte` into a per-batch folder;
3. per repeat, ONE runner invocation for every method (`taskset MASK et_bench --methods a,b,...`),
   started in the background with its PID, stdout, stderr and exit status in files; the same shell
   command then polls (on the phone side, up to a few seconds per round-trip) for the exit status.
   Past the deadline the runner is killed by its PID (`kill`, then `kill -9`), and what it printed
   before still counts;
4. `rm -rf` of the batch folder (in a `finally`), with the after-snapshot in the same round-trip.

The runner runs as a supervised background process (`remote_process.py`); what to rerun when it stops
on a method is `device.runner_driver`'s rules, shared with `local` (the stock runner: `stock_driver.py`).
Exit 126/127 (the runner is gone or not executable) raises and deploys it again next time. While the
runner runs, each poll also brings back the JSON lines it has printed since the last poll, so a method
is in hand as soon as it is finished. A connection lost mid-batch raises
`AdbConnectionLost` (an `AmcError`) whose `partial` maps every candidate already complete (all its
repeats received, or failed for good) to its `LatencyStats`; the table builder persists those and
re-raises, so a rerun measures only the rest. Earlier batches are the caller's (persisted each).

URI options (after `?`, `&`-separated): `runner=et_bench|executor_runner`, `max_temp_c=45` (`none`
disables the wait), `thermal_timeout_s=120`, `thermal_poll_s=5`, `timeout_s=` (per runner invocation;
default from the batch size), `auth_timeout_s=60`, `connect_timeout_s=10`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from device.errors import AmcError

from ..base import Candidate, Fingerprint, MeasureConfig, ProgressFn, PteDevice, tick
from device.lowering import lower_to_pte
from device.runner import executorch_version, invocation_timeout, parse_list, runner_error
from device.runner_driver import MethodResults
from device.stats import LatencyStats

from .connection import DEFAULT_AUTH_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S, AdbConnection, AdbConnectionLost, q
from . import host_protocol as hp
from .et_bench_driver import run_et_bench
from .deploy import REMOTE_DIR, RunnerBinary, ensure_runner, runner_status
from .hygiene import (DEFAULT_MAX_TEMP_C, DEFAULT_THERMAL_POLL_S, DEFAULT_THERMAL_TIMEOUT_S, ThermalGuard,
                      default_affinity_and_threads, frequency_changes, repeat_summary)
from .phone_info import INFO_SCRIPT, SNAPSHOT_SCRIPT, PhoneInfo, Snapshot, parse_info, parse_snapshot
from .remote_process import RemoteRun, clean_stale_sessions, new_session_name, run_in_background
from .server_connection import ServerConnection, local_server
from .stock_driver import run_stock
from .uri_options import parse_options, tcp_address

log = logging.getLogger("device.adb")

BACKEND = "xnnpack"
RUNS_DIR = f"{REMOTE_DIR}/runs"
POLL_WINDOW_S = 5.0  # longest phone-side wait per poll round-trip
_LIVE_SESSIONS: set[str] = set()  # session folders of AdbDevice objects alive in this process

class AdbDevice(PteDevice):
    """An Android phone over ADB: through an adb server (`server`), or directly with adb-shell."""

    def __init__(self, *, serial: str | None = None, host: str | None = None, port: int | None = None,
                 server: "hp.ServerAddress | None" = None, runner: str = "et_bench",
                 max_temp_c: float | None = DEFAULT_MAX_TEMP_C,
                 thermal_timeout_s: float = DEFAULT_THERMAL_TIMEOUT_S, thermal_poll_s: float = DEFAULT_THERMAL_POLL_S,
                 timeout_s: float | None = None, auth_timeout_s: float = DEFAULT_AUTH_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, key: str | os.PathLike | None = None):
        if runner not in ("et_bench", "executor_runner"):
            raise AmcError(f"unknown runner {runner!r}: use et_bench (default) or executor_runner")
        self.serial = serial
        self.conn: AdbConnection | ServerConnection  # one interface: run, push, close, connected
        if server is not None:
            if serial is None:
                raise ValueError("a phone behind an adb server needs its serial")
            self.uri = f"adb:{serial}" if server.source != "URI" else f"adb-server:{server}/{serial}"
            self.conn = ServerConnection(self.uri, server, serial, auth_timeout_s=auth_timeout_s,
                                         connect_timeout_s=connect_timeout_s)
        else:
            if serial is not None:
                self.uri = f"adb:{serial}"
            else:
                if host is None:
                    raise ValueError("give serial or host")
                port = int(port or 5555)
                self.uri = f"adb-tcp:{'[' + host + ']' if ':' in host else host}:{port}"
            self.conn = AdbConnection(self.uri, host=host, port=port, serial=serial, auth_timeout_s=auth_timeout_s,
                                      connect_timeout_s=connect_timeout_s, key=key)
        self.runner_kind = runner
        self.guard = ThermalGuard(max_temp_c, thermal_timeout_s, thermal_poll_s)
        self._timeout_s = timeout_s
        self.reference_error: str | None = None  # why the last measurement ran without its drift reference
        self.poll_window_s = POLL_WINDOW_S
        self._info: PhoneInfo | None = None
        self._runner: RunnerBinary | None = None
        self._session_ready = False
        self._session = new_session_name()
        _LIVE_SESSIONS.add(self._session)
        self._batch_no = 0
        self._invocation = 0
        self.last_batch_report: dict = {}
        self.batch_reports: list[dict] = []  # the last 200

    # ------------------------------------------------------------------ URIs

    @classmethod
    def from_usb_serial(cls, rest: str) -> "AdbDevice":
        """`adb:SERIAL`: through the local adb server when one answers, else directly over USB."""
        serial, _, query = rest.partition("?")
        opts = parse_options(f"adb:{rest}", query)
        if not serial:
            raise AmcError("bad device URI 'adb:': give the phone's serial (adb:SERIAL; `amc-mobile devices` lists them)")
        return cls(serial=serial, server=local_server(), **opts)

    @classmethod
    def from_server_address(cls, rest: str) -> "AdbDevice":
        """`adb-server:HOST:PORT/SERIAL`: a phone behind the adb server at HOST:PORT (e.g. another host's)."""
        uri = f"adb-server:{rest}"
        address, slash, tail = rest.partition("/")
        serial, _, query = tail.partition("?")
        if not slash or not serial:
            raise AmcError(f"bad device URI {uri!r}: expected adb-server:HOST:PORT/SERIAL "
                           f"(e.g. adb-server:192.168.1.5:5037/R58M123ABC)")
        host, port = hp.parse_host_port(address, f"device URI {uri!r}")
        return cls(serial=serial, server=hp.ServerAddress(host, port, "URI"), **parse_options(uri, query))

    @classmethod
    def from_tcp_address(cls, rest: str) -> "AdbDevice":
        address, _, query = rest.partition("?")
        uri = f"adb-tcp:{rest}"
        host, port = tcp_address(uri, address)
        return cls(host=host, port=port, **parse_options(uri, query))

    @property
    def session_dir(self) -> str:
        return f"{RUNS_DIR}/{self._session}"

    # ------------------------------------------------------------------ phone

    def phone_info(self, refresh: bool = False) -> PhoneInfo:
        """Properties, clusters, governors, temperatures: one shell round-trip (cached)."""
        if self._info is None or refresh:
            out, _ = self.conn.run(INFO_SCRIPT, what="reading the phone's properties")
            try:
                self._info = parse_info(out)
            except ValueError as exc:
                raise AmcError(f"{self.uri}: {exc}: {out[-200:]!r}") from None
        return self._info

    def snapshot(self) -> Snapshot:
        out, _ = self.conn.run(SNAPSHOT_SCRIPT, what="reading temperatures and frequencies")
        return parse_snapshot(out)

    def defaults(self) -> tuple[str | None, int]:
        """(affinity mask, threads) used when the MeasureConfig leaves them None."""
        return default_affinity_and_threads(self.phone_info().cores)

    def _resolve(self, config: MeasureConfig) -> tuple[str | None, int]:
        mask, threads = self.defaults()
        affinity = config.affinity if config.affinity is not None else mask
        if affinity is not None:
            affinity = format(int(affinity, 16), "x")
        return affinity, int(config.threads if config.threads is not None else threads)

    def runtime(self) -> str:
        if self.runner_kind == "executor_runner":
            return f"executor_runner-{executorch_version()}"
        return f"executorch-{executorch_version()}"

    def fingerprint(self, config: MeasureConfig | None = None) -> Fingerprint:
        config = config or MeasureConfig()
        info = self.phone_info()
        affinity, threads = self._resolve(config)
        extra = {
            "android_version": info.android_version,
            "sdk": info.sdk,
            "abi": info.abi,
            "soc": info.soc,
            "clusters": [{"name": c.name, "cpus": c.cpus, "max_khz": c.max_khz} for c in info.clusters],
            "governors": sorted({c.governor for c in info.cores if c.governor}),
            "build_fingerprint": info.props.get("ro.build.fingerprint", ""),
            "runner": self.runner_kind,
        }
        return Fingerprint(kind="adb", hardware=info.hardware, runtime=self.runtime(), backend=BACKEND,
                           threads=threads, affinity=affinity, extra=extra)

    def info(self) -> dict:
        info = self.phone_info(refresh=True)
        affinity, threads = self.defaults()
        d = {
            "uri": self.uri,
            "transport": (f"adb server at {self.conn.address}" if isinstance(self.conn, ServerConnection)
                          else "direct (adb-shell)"),
            "fingerprint": self.fingerprint().to_dict(),
            "phone": info.to_dict(),
            "defaults": {"affinity": affinity, "threads": threads},
            "thermal_guard": {"max_temp_c": self.guard.max_temp_c, "timeout_s": self.guard.timeout_s},
            "runner": runner_status(self.conn, self.runner_kind, info.abi),
        }
        return d

    @property
    def runner(self) -> str:
        """The runner's path on the phone, deployed (pushed if missing or different) on first use."""
        self._prepare()
        return self._runner.remote

    def _prepare(self) -> None:
        info = self.phone_info()
        if not self._session_ready:
            # runners and folders of earlier sessions of this host that are gone (a lost connection, a killed process)
            clean_stale_sessions(self.conn, self.uri, RUNS_DIR, _LIVE_SESSIONS)
            self._session_ready = True
        if self._runner is None:
            self._runner = ensure_runner(self.conn, self.runner_kind, info.abi)
            log.info("%s: runner %s", self.uri, self._runner.describe())

    # ------------------------------------------------------------------ measure

    def measure(self, candidates: Sequence[Candidate], config: MeasureConfig = MeasureConfig(),
                progress: ProgressFn | None = None) -> list[LatencyStats]:
        candidates = list(candidates)
        if not candidates:
            return []
        self._prepare()  # fail before spending minutes on lowering
        self.reference_error = None  # set when the reference fails
        with tempfile.TemporaryDirectory(prefix="amc-adb-") as tmp:
            pte = Path(tmp) / "batch.pte"
            failed = lower_to_pte(candidates, pte)
            for _ in failed:
                tick(progress)
            names = [c.name for c in candidates if c.name not in failed]
            try:
                measured = self._measure_remote(pte, names, config, progress) if names else {}
            except AdbConnectionLost as exc:
                exc.partial = {**{n: LatencyStats.failed(n, why) for n, why in failed.items()}, **exc.partial}
                raise
        return [LatencyStats.failed(c.name, failed[c.name]) if c.name in failed else measured[c.name]
                for c in candidates]

    def measure_pte(self, path: str | os.PathLike, methods: Sequence[str] | None = None,
                    config: MeasureConfig = MeasureConfig(), progress: ProgressFn | None = None) -> list[LatencyStats]:
        """Time the methods of an existing `.pte` (all of them when `methods` is None): one push."""
        path = Path(path)
        if not path.is_file():
            raise AmcError(f"no such .pte file: {path}")
        if methods is not None:
            methods = list(methods)
            if not methods:
                return []
        self._prepare()
        self.reference_error = None  # set when the reference fails
        measured = self._measure_remote(path, methods, config, progress)
        return list(measured.values()) if methods is None else [measured[m] for m in methods]

    def list_methods(self, path: str | os.PathLike) -> list[str]:
        """The method names in a local `.pte` (pushed and read by et_bench --list on the phone)."""
        out: list[str] = []
        self._prepare()
        bdir = self._new_batch_dir()
        try:
            remote = f"{bdir}/batch.pte"
            self.conn.push(path, remote, what=f"push of {Path(path).name}")
            out = self._list_remote(remote)
        finally:
            self._cleanup(bdir)
        return out

    def _list_remote(self, remote_pte: str) -> list[str]:
        if self.runner_kind != "et_bench":
            raise AmcError("executor_runner cannot list a program's methods: give the method names")
        text, rc = self.conn.run(f"{q(self._runner.remote)} --model_path {q(remote_pte)} --list 2>&1",
                                 timeout_s=120, what="listing the program's methods")
        if rc != 0:
            raise runner_error(rc, text)
        return parse_list(text)

    def timeout_for(self, n_methods: int, config: MeasureConfig) -> float:
        """Phones are slower than the host: twice local's bound (min_time and adaptive caps included)."""
        if self._timeout_s is not None:
            return float(self._timeout_s)
        return invocation_timeout(n_methods, config, slowness=2.0)

    def _new_batch_dir(self) -> str:
        self._batch_no += 1
        return f"{self.session_dir}/b{self._batch_no:05d}"

    def _measure_remote(self, local_pte: Path, names: list[str] | None, config: MeasureConfig,
                        progress: ProgressFn | None) -> dict[str, LatencyStats]:
        """One batch on the phone: guard, push, run (per repeat), snapshot, clean up."""
        affinity, threads = self._resolve(config)
        bdir = self._new_batch_dir()
        report: dict = {"uri": self.uri, "batch": self._batch_no, "runner": self.runner_kind, "threads": threads,
                        "affinity": affinity, "repeats": int(max(1, config.repeats))}
        t0 = time.monotonic()
        wait = self.guard.wait(self.snapshot, self.uri)
        report["thermal"] = {"max_temp_c": self.guard.max_temp_c, "waited_s": round(wait.waited_s, 3),
                             "timed_out": wait.timed_out, "start_cpu_temp_c": wait.start_temp_c}
        report["before"] = wait.snapshot.to_dict()
        cleaned = False
        lost = False
        results = MethodResults(config.repeats, progress)
        first_invocation = self._invocation
        try:
            remote_pte = f"{bdir}/batch.pte"
            t_push = time.monotonic()
            self.conn.push(local_pte, remote_pte,
                           what=f"push of batch {self._batch_no} ({len(names) if names else 'all'} methods)")
            report["push_s"] = round(time.monotonic() - t_push, 4)
            report["pte_bytes"] = os.path.getsize(local_pte)
            if names is None:
                names = self._list_remote(remote_pte)
            report["methods"] = len(names)
            t_run = time.monotonic()
            if self.runner_kind == "executor_runner":
                measured = run_stock(names, self._runner.remote, remote_pte, config, threads,
                                     prefix=self._taskset_prefix(affinity), start=lambda cmd, t: self._start(bdir, cmd, t),
                                     timeout_s=self.timeout_for(1, config), read_log=self._log_reader(),
                                     results=results, uri=self.uri)
            else:
                measured = self._run_et_bench(bdir, remote_pte, names, config, threads, affinity, results)
            report["run_s"] = round(time.monotonic() - t_run, 4)
            cleaned = True  # from here on, a lost connection costs the snapshot, not the measurements
            try:
                out, _ = self.conn.run(f"rm -rf {q(bdir)}; {SNAPSHOT_SCRIPT}", what="cleaning up the batch")
                after = parse_snapshot(out)
                report["after"] = after.to_dict()
                report["frequency_changes"] = frequency_changes(wait.snapshot, after)
            except AdbConnectionLost as exc:
                log.warning("%s: %s (the batch's results are kept; the next batch reconnects)", self.uri, exc)
                report["after"], report["frequency_changes"] = {}, []
        except AdbConnectionLost as exc:
            lost = True
            exc.partial = dict(results.complete)
            raise
        finally:
            if not cleaned and not lost:
                self._cleanup(bdir)
        report["invocations"] = self._invocation - first_invocation
        report["runtime_version"] = results.runtime_version
        report["candidates"] = {n: repeat_summary(n, results.per_repeat.get(n, [])) for n in names}
        spreads = [c["spread_pct"] for c in report["candidates"].values() if c["spread_pct"] is not None]
        report["max_spread_pct"] = max(spreads) if spreads else None
        report["seconds"] = round(time.monotonic() - t0, 3)
        self.last_batch_report = report
        self.batch_reports = (self.batch_reports + [report])[-200:]
        b, a = report["before"].get("max_cpu_temp_c"), report["after"].get("max_cpu_temp_c")
        log.info("%s batch %d: %d methods x %d repeats in %.1f s (push %.2f s); waited %.0f s for the thermal guard; "
                 "CPU %s -> %s °C; max repeat spread %s %%%s", self.uri, report["batch"], len(names),
                 report["repeats"], report["seconds"], report.get("push_s", 0.0), wait.waited_s, b, a,
                 report["max_spread_pct"],
                 ("; " + ", ".join(report["frequency_changes"][:4])) if report["frequency_changes"] else "")
        return measured

    def _cleanup(self, bdir: str) -> None:
        try:
            self.conn.run(f"rm -rf {q(bdir)}", what="cleaning up the batch")
        except AmcError as exc:
            log.warning("%s: could not remove %s: %s", self.uri, bdir, exc)

    # ------------------------------------------------------------------ runners

    def _taskset_prefix(self, affinity: str | None) -> str:
        """Pinning by `taskset` where the phone has it (else et_bench pins itself, `--affinity`)."""
        return f"taskset {q(affinity)} " if affinity is not None and self.phone_info().has("taskset") else ""

    def _run_et_bench(self, bdir: str, remote_pte: str, names: list[str], config: MeasureConfig, threads: int,
                      affinity: str | None, results: MethodResults) -> dict[str, LatencyStats]:
        def start(command: str, timeout_s: float, on_stdout) -> RemoteRun:
            run = self._start(bdir, command, timeout_s, on_stdout)
            if run.returncode in (126, 127):
                self._runner = None  # gone or not executable: deploy again next time
                why = runner_error(run.returncode, run.stderr or run.stdout, self.runner_kind)
                raise AmcError(f"the runner on {self.uri} cannot be started ({why}); rerun to push it again")
            return run

        measured, reference_error = run_et_bench(names, self._runner.remote, remote_pte, config, threads=threads,
                                                 affinity=affinity, prefix=self._taskset_prefix(affinity),
                                                 start=start, timeout_for=self.timeout_for, results=results,
                                                 uri=self.uri)
        self.reference_error = reference_error or self.reference_error
        return measured

    def _start(self, bdir: str, command: str, timeout_s: float,
               on_stdout: Callable[[str], None] | None = None) -> RemoteRun:
        """One runner invocation in the batch folder, supervised (killed by PID past `timeout_s`)."""
        self._invocation += 1
        return run_in_background(self.conn, bdir, f"i{self._invocation:04d}", command, timeout_s,
                                 window_s=self.poll_window_s, uri=self.uri, name=self.runner_kind,
                                 what=f"run of {self.runner_kind} (batch {self._batch_no})", on_stdout=on_stdout)

    def _log_reader(self):
        """The stock runner's logcat by PID (where its log does not go to stderr), None without logcat."""
        if not self.phone_info().has("logcat"):
            return None

        def read(pid: int) -> str:
            return self.conn.run(f"logcat -d -v brief --pid={int(pid)} 2>/dev/null",
                                 what="reading executor_runner's log")[0]

        return read

    def close(self) -> None:
        if self.conn.connected and self._batch_no:
            try:  # the session folder is empty by now (each batch removes its own)
                self.conn.run(f"rmdir {q(self.session_dir)} 2>/dev/null; true", timeout_s=10,
                              what="removing the session folder")
            except AmcError:
                pass
        self.conn.close()
        _LIVE_SESSIONS.discard(self._session)

    def __del__(self):
        _LIVE_SESSIONS.discard(getattr(self, "_session", None))
