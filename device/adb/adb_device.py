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

Failure handling follows `local`: the methods the runner finished keep their samples, the method it
stopped on gets the runner's reason, and it is restarted for the rest; exit 2 (bad arguments) raises.
While the runner runs, each poll also brings back the JSON lines it has printed since the last poll,
so a method is in hand as soon as it is finished. A connection lost mid-batch raises
`AdbConnectionLost` (an `AmcError`) whose `partial` maps every candidate already complete (all its
repeats received, or failed for good) to its `LatencyStats`; the table builder persists those and
re-raises, so a rerun measures only the rest. Earlier batches are the caller's (persisted each).

URI options (after `?`, `&`-separated): `runner=et_bench|executor_runner`, `max_temp_c=45` (`none`
disables the wait), `thermal_timeout_s=120`, `thermal_poll_s=5`, `timeout_s=` (per runner invocation;
default from the batch size), `auth_timeout_s=60`, `connect_timeout_s=10`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl

from device.errors import AmcError

from ..base import Candidate, Fingerprint, MeasureConfig, ProgressFn, PteDevice
from device.lowering import lower_to_pte
from device.runner import (EXIT_LOAD, EXIT_USAGE, RunResult, build_argv, failed_method, parse_list, parse_output,
                           runner_error)
from device.stats import LatencyStats, merge_repeats

from . import executor_runner as stock
from .connection import (DEFAULT_AUTH_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S, AdbConnection, AdbConnectionLost,
                         list_usb_serials, q)
from . import host_protocol as hp
from .deploy import REMOTE_DIR, RunnerBinary, ensure_runner, find_local_runner, remote_path, remote_sha256, sha256_file
from .hygiene import (DEFAULT_MAX_TEMP_C, DEFAULT_THERMAL_POLL_S, DEFAULT_THERMAL_TIMEOUT_S, ThermalGuard,
                      default_affinity_and_threads, frequency_changes, repeat_summary)
from .phone_info import INFO_SCRIPT, SNAPSHOT_SCRIPT, PhoneInfo, Snapshot, parse_info, parse_snapshot
from .server_connection import ServerConnection, local_server

log = logging.getLogger("device.adb")

BACKEND = "xnnpack"
RUNS_DIR = f"{REMOTE_DIR}/runs"
POLL_WINDOW_S = 5.0  # longest phone-side wait per poll round-trip
_LIVE_SESSIONS: set[str] = set()  # session folders of AdbDevice objects alive in this process
_OPTIONS = {"runner", "max_temp_c", "thermal_timeout_s", "thermal_poll_s", "timeout_s", "auth_timeout_s",
            "connect_timeout_s"}


def executorch_version() -> str:
    from device.local import executorch_version as v

    return v()


def _parse_options(uri: str, query: str) -> dict:
    opts: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise AmcError(f"unknown option {key!r} in device URI {uri!r}: known are {', '.join(sorted(_OPTIONS))}")
        if key == "runner":
            opts[key] = value
            continue
        if key == "max_temp_c" and value.lower() in ("", "none", "off", "0"):
            opts[key] = None
            continue
        try:
            opts[key] = float(value)
        except ValueError:
            raise AmcError(f"option {key}={value!r} in device URI {uri!r} must be a number") from None
        if not (math.isfinite(opts[key]) and opts[key] > 0):  # a NaN timeout never fires; a negative one at once
            raise AmcError(f"option {key}={value!r} in device URI {uri!r} must be a positive number")
    return opts


def _tcp_address(uri: str, address: str) -> tuple[str, int]:
    """(host, port) of `HOST[:PORT]` or `[IPv6][:PORT]`; `uri` is what the error message shows."""
    m = re.fullmatch(r"\[(?P<h6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]]+)(?::(?P<p>\d+))?", address)
    if not m:
        raise AmcError(f"bad device URI {uri!r}: expected adb-tcp:HOST:PORT (e.g. adb-tcp:192.168.1.20:5555)")
    port = int(m.group("p6") or m.group("p") or 5555)
    if not 0 < port < 65536:
        raise AmcError(f"bad port in device URI {uri!r}: expected 1..65535")
    return m.group("h6") or m.group("h"), port


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
        host_tag = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
        self._session = f"{host_tag}-{os.getpid()}-{secrets.token_hex(4)}"
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
        opts = _parse_options(f"adb:{rest}", query)
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
        return cls(serial=serial, server=hp.ServerAddress(host, port, "URI"), **_parse_options(uri, query))

    @classmethod
    def from_tcp_address(cls, rest: str) -> "AdbDevice":
        address, _, query = rest.partition("?")
        uri = f"adb-tcp:{rest}"
        host, port = _tcp_address(uri, address)
        return cls(host=host, port=port, **_parse_options(uri, query))

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
            "runner": self._runner_status(info),
        }
        return d

    def _runner_status(self, info: PhoneInfo) -> dict:
        remote = remote_path(self.runner_kind)
        status = {"kind": self.runner_kind, "remote": remote}
        try:
            local = find_local_runner(self.runner_kind, info.abi)
        except AmcError as exc:
            return {**status, "local": f"error: {exc}"}
        on_phone = remote_sha256(self.conn, remote)
        status["local"] = str(local) if local else None
        status["on_phone"] = bool(on_phone)
        if local is not None:
            status["up_to_date"] = on_phone == sha256_file(local)
        elif not on_phone:
            status["local"] = "missing: see android_bench/README.md"
        return status

    @property
    def runner(self) -> str:
        """The runner's path on the phone, deployed (pushed if missing or different) on first use."""
        self._prepare()
        return self._runner.remote

    def _prepare(self) -> None:
        info = self.phone_info()
        if not self._session_ready:
            self._clean_stale_sessions()
            self._session_ready = True
        if self._runner is None:
            self._runner = ensure_runner(self.conn, self.runner_kind, info.abi)
            log.info("%s: runner %s", self.uri, self._runner.describe())

    def _clean_stale_sessions(self) -> None:
        """Kill runners and remove folders left by sessions of this host that are gone (a lost
        connection, a killed process); warn about runners of other live sessions."""
        script = (f"for d in {q(RUNS_DIR)}/*; do [ -d \"$d\" ] || continue; echo \"@@s ${{d##*/}}\"; "
                  f"for p in \"$d\"/*/*.pid; do [ -f \"$p\" ] || continue; pid=$(cat \"$p\"); "
                  f"[ -n \"$pid\" ] && grep -qF \"$d/\" /proc/$pid/cmdline 2>/dev/null && echo \"alive $pid\"; "
                  f"done; done")
        out, _ = self.conn.run(script, what="looking for leftover runs")
        sessions: dict[str, list[int]] = {}
        current = None
        for line in out.splitlines():
            if line.startswith("@@s "):
                current = line[4:].strip()
                sessions[current] = []
            elif line.startswith("alive ") and current is not None:
                sessions[current].append(int(line.split()[1]))
        me = socket.gethostname()
        me_tag = re.sub(r"[^A-Za-z0-9_.-]", "_", me)[:40] or "host"
        for name, pids in sessions.items():
            if name in _LIVE_SESSIONS:
                continue
            m = re.fullmatch(r"(?P<host>.+)-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)", name)
            mine = bool(m) and m.group("host") == me_tag
            owner_gone = mine and (int(m.group("pid")) == os.getpid() or not _pid_alive(int(m.group("pid"))))
            if not owner_gone:
                if pids:
                    log.warning("%s: another measurement seems to be running on the phone (pids %s, session %s); "
                                "results may be disturbed", self.uri, pids, name)
                continue
            kill = " ".join(f"kill -9 {int(p)} 2>/dev/null;" for p in pids)
            self.conn.run(f"{kill} rm -rf {q(RUNS_DIR + '/' + name)}", what="removing a leftover run")
            if pids:
                log.warning("%s: killed runner(s) %s left by an earlier session (%s)", self.uri, pids, name)

    # ------------------------------------------------------------------ measure

    def measure(self, candidates: Sequence[Candidate], config: MeasureConfig = MeasureConfig(),
                progress: ProgressFn | None = None) -> list[LatencyStats]:
        candidates = list(candidates)
        if not candidates:
            return []
        self._prepare()  # fail before spending minutes on lowering
        with tempfile.TemporaryDirectory(prefix="amc-adb-") as tmp:
            pte = Path(tmp) / "batch.pte"
            failed = lower_to_pte(candidates, pte)
            for _ in failed:
                _tick(progress)
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
        """A generous bound for one invocation (phones are slower than the host: twice local's)."""
        if self._timeout_s is not None:
            return float(self._timeout_s)
        per_method = 60.0 + 4.0 * (config.warmup + config.iterations) + 3.0 * config.min_time_ms / 1000.0
        if config.ci_target > 0:  # adaptive rounds: each group may time up to max_time_ms
            groups = -(-n_methods // max(1, config.group))
            return 120.0 + n_methods * per_method + groups * 2.0 * config.max_time_ms / 1000.0
        return 120.0 + n_methods * per_method

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
        state = _BatchState()
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
                results = self._run_stock(bdir, remote_pte, names, config, threads, affinity, progress, state)
            else:
                results = self._run_et_bench(bdir, remote_pte, names, config, threads, affinity, progress, state)
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
            exc.partial = {n: s for n, s in state.complete.items()}
            raise
        finally:
            if not cleaned and not lost:
                self._cleanup(bdir)
        report["invocations"] = state.invocations
        report["runtime_version"] = state.runtime_version
        report["candidates"] = {n: repeat_summary(n, state.per_repeat.get(n, [])) for n in names}
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
        return results

    def _cleanup(self, bdir: str) -> None:
        try:
            self.conn.run(f"rm -rf {q(bdir)}", what="cleaning up the batch")
        except AmcError as exc:
            log.warning("%s: could not remove %s: %s", self.uri, bdir, exc)

    # ------------------------------------------------------------------ et_bench

    def _run_et_bench(self, bdir: str, remote_pte: str, names: list[str], config: MeasureConfig, threads: int,
                      affinity: str | None, progress: ProgressFn | None, state: "_BatchState") -> dict[str, LatencyStats]:
        use_taskset = affinity is not None and self.phone_info().has("taskset")
        argv_config = dataclasses.replace(config, threads=threads, affinity=None if use_taskset else affinity)
        prefix = f"taskset {q(affinity)} " if use_taskset else ""
        repeats = max(1, int(config.repeats))
        errors: dict[str, str] = {}
        for rep in range(repeats):
            todo = [n for n in names if n not in errors]
            timeouts = 0
            while todo:
                argv = build_argv(self._runner.remote, remote_pte, argv_config, todo, default_threads=threads)
                taken: set[str] = set()  # methods of this invocation already recorded

                def take(records, todo=todo, taken=taken, last=rep == repeats - 1) -> None:
                    """Record finished methods as their lines arrive (polls while running, then the end)."""
                    for rec in records:
                        if rec.method in todo and rec.method not in taken:
                            taken.add(rec.method)
                            state.per_repeat.setdefault(rec.method, []).append(rec.to_stats())
                            state.runtime_version = state.runtime_version or rec.runtime_version
                            if last:
                                state.complete[rec.method] = merge_repeats(rec.method, state.per_repeat[rec.method])
                                _tick(progress)

                res = self._invoke(bdir, prefix + " ".join(q(a) for a in argv), self.timeout_for(len(todo), config),
                                   state, on_records=take).result
                take(res.records)
                done = {r.method for r in res.records}
                if res.error is None:
                    missing = [n for n in todo if n not in done]
                    if missing:
                        raise AmcError(f"et_bench on {self.uri} exited 0 but did not report {', '.join(missing[:5])}")
                    break
                if res.returncode == EXIT_USAGE:
                    raise res.error
                if res.returncode in (126, 127):
                    self._runner = None  # gone or not executable: deploy again next time
                    raise AmcError(f"the runner on {self.uri} cannot be started ({res.error}); rerun to push it again")
                if res.returncode == EXIT_LOAD and "cannot load program" in str(res.error):
                    for n in todo:
                        if n not in done:
                            errors[n] = str(res.error)
                            state.complete[n] = LatencyStats.failed(n, errors[n])
                            _tick(progress)
                    break
                rest = [n for n in todo if n not in done]
                if not rest:
                    break
                # Interleaved runs name the method they stopped on; otherwise it is the first one not done.
                culprit = res.failed if res.failed is not None else rest[0]
                if argv_config.reference is not None and culprit == argv_config.reference:
                    # The same rule as `local`: a failing reference is dropped, the batch goes on without it.
                    self.reference_error = (f"the drift reference {culprit!r} failed on {self.uri} ({res.error}); "
                                            f"measured without it (rows unreferenced)")
                    log.warning(self.reference_error)
                    argv_config = dataclasses.replace(argv_config, reference=None)
                    if culprit not in rest:
                        todo = rest
                        continue
                errors[culprit] = f"et_bench failed on {culprit!r}: {res.error}"
                state.complete[culprit] = LatencyStats.failed(culprit, errors[culprit])
                _tick(progress)
                todo = [n for n in rest if n != culprit]
                timeouts = timeouts + 1 if res.returncode is None else 0
                if res.returncode is None and timeouts >= 2 and not done:  # two hangs in a row without progress
                    for n in todo:
                        errors[n] = f"not measured: et_bench keeps timing out ({res.error})"
                        state.complete[n] = LatencyStats.failed(n, errors[n])
                        _tick(progress)
                    todo = []
        return {n: LatencyStats.failed(n, errors[n]) if n in errors else merge_repeats(n, state.per_repeat.get(n, []))
                for n in names}

    # ------------------------------------------------------------------ executor_runner

    def _run_stock(self, bdir: str, remote_pte: str, names: list[str], config: MeasureConfig, threads: int,
                   affinity: str | None, progress: ProgressFn | None, state: "_BatchState") -> dict[str, LatencyStats]:
        prefix = f"taskset {q(affinity)} " if affinity is not None and self.phone_info().has("taskset") else ""
        if config.min_time_ms:
            log.info("%s: executor_runner cannot honour min_time_ms; running warmup + iterations executions",
                     self.uri)
        repeats = max(1, int(config.repeats))
        errors: dict[str, str] = {}
        for rep in range(repeats):
            for n in names:
                if n in errors:
                    continue
                argv = stock.build_argv(self._runner.remote, remote_pte, config, n, threads)
                res = self._invoke(bdir, prefix + " ".join(q(a) for a in argv), self.timeout_for(1, config), state,
                                   parse=False)
                text = res.stdout + "\n" + res.stderr
                parsed = stock.parse_output(text)
                if res.returncode == 0 and not parsed.samples_ms and self.phone_info().has("logcat") and res.pid:
                    logs, _ = self.conn.run(f"logcat -d -v brief --pid={int(res.pid)} 2>/dev/null",
                                            what="reading executor_runner's log")
                    parsed = stock.parse_output(logs)
                if res.returncode != 0:
                    errors[n] = stock.failure_reason(text, res.returncode)
                else:
                    try:
                        state.per_repeat.setdefault(n, []).append(parsed.stats(n, config.warmup))
                    except AmcError as exc:
                        errors[n] = str(exc)
                if n in errors:
                    state.complete[n] = LatencyStats.failed(n, errors[n])
                    _tick(progress)
                elif rep == repeats - 1:
                    state.complete[n] = merge_repeats(n, state.per_repeat[n])
                    _tick(progress)
        return {n: LatencyStats.failed(n, errors[n]) if n in errors else merge_repeats(n, state.per_repeat.get(n, []))
                for n in names}

    # ------------------------------------------------------------------ one invocation

    def _invoke(self, bdir: str, command: str, timeout_s: float, state: "_BatchState",
                parse: bool = True, on_records=None) -> "_Invocation":
        """Run `command` in the background on the phone; wait for it (phone-side polling) until
        `timeout_s`, then kill it by PID. Never raises for a runner failure; raises
        AdbConnectionLost when the phone goes away. With `on_records`, every poll while the runner
        runs also fetches the stdout it printed since the last one, and the complete method lines
        go to `on_records` at once (so a lost connection loses no finished method)."""
        self._invocation += 1
        state.invocations += 1
        base = f"{bdir}/i{self._invocation:04d}"
        out, err, rc, pid = (q(base + s) for s in (".out", ".err", ".rc", ".pid"))
        launch = (f"( trap '' HUP; {command} >{out} 2>{err} </dev/null & echo $! >{pid}; wait $!; "
                  f"echo $? >{rc}.tmp; mv {rc}.tmp {rc} ) >/dev/null 2>&1 </dev/null & ")
        deadline = time.monotonic() + timeout_s
        what = f"run of {self.runner_kind} (batch {self._batch_no})"
        window = self.poll_window_s
        stream = _OutputTail() if on_records is not None else None

        def poll(script: str) -> _PollStatus:
            text, _ = self.conn.run(script, timeout_s=window + 30, what=what)
            status = _parse_poll(text)
            if stream is not None and status.rc is None and status.partial is not None:
                lines = stream.feed(*status.partial)
                if lines:
                    try:
                        records = parse_output(lines)
                    except AmcError:  # not a runner's output: the final parse says so
                        records = []
                    if records:
                        on_records(records)
            return status

        status = poll(launch + self._poll_script(base, min(window, timeout_s), stream))
        while status.rc is None and time.monotonic() < deadline:
            status = poll(self._poll_script(base, min(window, max(0.05, deadline - time.monotonic())), stream))
        timed_out = status.rc is None
        if timed_out:
            text, _ = self.conn.run(self._kill_script(base, bdir), timeout_s=30, what=f"killing the hung {self.runner_kind}")
            status = _parse_poll(text)
            log.warning("%s: %s did not finish within %.0f s; killed pid %s", self.uri, self.runner_kind, timeout_s,
                        status.pid)
        returncode = None if timed_out else status.rc
        if returncode is not None and returncode > 128 and returncode - 128 in _SIGNALS:
            returncode = -(returncode - 128)
        inv = _Invocation(status.stdout, status.stderr, returncode, status.pid)
        if not parse:
            return inv
        records = parse_output(status.stdout)
        if timed_out:
            done = ", ".join(r.method for r in records) or "none"
            error = AmcError(f"{self.runner_kind} did not finish within {timeout_s:.0f}s on {self.uri} and was killed "
                             f"(pid {status.pid}; methods done: {done[:200]})")
        elif returncode == 0:
            error = None
        else:
            error = runner_error(returncode, status.stderr or status.stdout, self.runner_kind)
        culprit = failed_method(status.stdout) if error is not None else None
        inv.result = RunResult(records, returncode, error, status.stderr, culprit[0] if culprit else None)
        return inv

    @staticmethod
    def _poll_script(base: str, window_s: float, stream: "_OutputTail | None" = None) -> str:
        """Wait on the phone until `base.rc` exists (10 ms steps for 0.2 s, then 50 ms) or `window_s`
        passed; print the state, and the outputs once it is done (with `stream`: while it runs, the
        stdout printed since `stream.offset`)."""
        rc = q(base + ".rc")
        n_fast = max(1, min(20, int(window_s / 0.01)))
        n_slow = max(0, int((window_s - 0.2) / 0.05 + 0.999))
        return (f"i=0; while [ ! -f {rc} ] && [ $i -lt {n_fast} ]; do sleep 0.01; i=$((i+1)); done; "
                f"i=0; while [ ! -f {rc} ] && [ $i -lt {n_slow} ]; do sleep 0.05; i=$((i+1)); done; "
                + _report_script(base, None if stream is None else stream.offset))

    @staticmethod
    def _kill_script(base: str, bdir: str) -> str:
        """Kill the runner by the PID it was started with (SIGTERM, then SIGKILL after 2 s), only if
        /proc/PID/cmdline still names this batch's folder (never a recycled PID)."""
        pid, rc, d = q(base + ".pid"), q(base + ".rc"), q(bdir + "/")
        ours = f"[ -n \"$p\" ] && grep -qF {d} /proc/$p/cmdline 2>/dev/null"
        return (f"p=$(cat {pid} 2>/dev/null); if {ours}; then kill $p 2>/dev/null; fi; "
                f"i=0; while [ ! -f {rc} ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; "
                f"if [ ! -f {rc} ] && {ours}; then kill -9 $p 2>/dev/null; fi; "
                f"i=0; while [ ! -f {rc} ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; "
                + _report_script(base))

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


# -- helpers ---------------------------------------------------------------------------------------

_SIGNALS = {int(s) for s in signal.Signals}
_OUT_MARK, _ERR_MARK, _END_MARK, _PART_MARK = "@@AMC_OUT@@", "@@AMC_ERR@@", "@@AMC_END@@", "@@AMC_PART"


def _report_script(base: str, offset: int | None = None) -> str:
    """The runner's state; once it is done its stdout and stderr; with `offset`, while it runs, its
    stdout from byte `offset` on (`tail -c +N`; where that fails, all of it, saying so)."""
    rc, pid, out, err = (q(base + s) for s in (".rc", ".pid", ".out", ".err"))
    running = ""
    if offset is not None:
        start = int(offset) + 1
        running = (f"else if tail -c +{start} {out} >/dev/null 2>&1; then echo \"{_PART_MARK} {int(offset)}\"; "
                   f"tail -c +{start} {out} 2>/dev/null; else echo \"{_PART_MARK} 0\"; cat {out} 2>/dev/null; fi; "
                   f"printf '\\n{_END_MARK}\\n'; ")
    return (f"echo \"@@AMC_STATE $(cat {rc} 2>/dev/null || echo running) $(cat {pid} 2>/dev/null)\"; "
            f"if [ -f {rc} ]; then echo {_OUT_MARK}; cat {out} 2>/dev/null; printf '\\n{_ERR_MARK}\\n'; "
            f"cat {err} 2>/dev/null; printf '\\n{_END_MARK}\\n'; {running}fi")


class _PollStatus:
    def __init__(self, rc, pid, stdout, stderr, partial=None):
        self.rc, self.pid, self.stdout, self.stderr = rc, pid, stdout, stderr
        self.partial: tuple[int, str] | None = partial  # (byte offset, stdout from there) while running


def _parse_poll(text: str) -> _PollStatus:
    m = re.search(r"@@AMC_STATE (\S+)(?: (\d+))?", text)
    if not m:
        raise AmcError(f"unexpected answer from the phone while waiting for the runner: {text[-200:]!r}")
    rc = int(m.group(1)) if re.fullmatch(r"-?\d+", m.group(1)) else None
    pid = int(m.group(2)) if m.group(2) else None
    stdout = stderr = ""
    partial = None
    if _OUT_MARK + "\n" in text:
        body = text.split(_OUT_MARK + "\n", 1)[1]
        stdout, _, rest = body.partition("\n" + _ERR_MARK + "\n")
        stderr = rest.rpartition("\n" + _END_MARK)[0]
    else:
        p = re.search(re.escape(_PART_MARK) + r" (\d+)\n", text)
        if p and "\n" + _END_MARK in text[p.end() - 1:]:
            partial = (int(p.group(1)), text[p.end():].rpartition("\n" + _END_MARK)[0])
    return _PollStatus(rc, pid, stdout, stderr, partial)


class _OutputTail:
    """The runner's stdout as it grows, polled in pieces: hands out each complete line once."""

    def __init__(self):
        self.offset = 0  # bytes of stdout consumed (complete lines only)

    def feed(self, start: int, text: str) -> str:
        data = text.encode("utf-8", "surrogateescape")
        if start > self.offset:  # a gap (cannot happen with tail -c +N): wait for a full copy
            return ""
        data = data[self.offset - start:]
        end = data.rfind(b"\n") + 1
        if end <= 0:
            return ""
        self.offset += end
        return data[:end].decode("utf-8", "replace")


class _Invocation:
    def __init__(self, stdout: str, stderr: str, returncode: int | None, pid: int | None):
        self.stdout, self.stderr, self.returncode, self.pid = stdout, stderr, returncode, pid
        self.result: RunResult | None = None


class _BatchState:
    def __init__(self):
        self.per_repeat: dict[str, list[LatencyStats]] = {}
        self.complete: dict[str, LatencyStats] = {}
        self.invocations = 0
        self.runtime_version: str | None = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tick(progress: ProgressFn | None) -> None:
    if progress is not None:
        progress(1)


# -- discovery -------------------------------------------------------------------------------------

ENV_TCP = "AMC_ADB_TCP"


def tcp_entries() -> list[str]:
    """The entries of $AMC_ADB_TCP (comma or space separated), each checked as the user typed it:
    a malformed one is an AmcError that names the variable and the entry."""
    entries = [e for e in re.split(r"[,\s]+", os.environ.get(ENV_TCP, "").strip()) if e]
    for entry in entries:
        address, _, query = entry.partition("?")
        try:
            _tcp_address(entry, address)
        except AmcError:
            raise AmcError(f"bad {ENV_TCP} entry {entry!r}: expected HOST:PORT (port 1..65535), comma-separated, "
                           f"e.g. {ENV_TCP}=192.168.1.20:5555,10.0.0.7:5555") from None
        try:
            _parse_options(entry, query)
        except AmcError as exc:
            raise AmcError(f"bad {ENV_TCP} entry: {exc}") from None
    return entries


def discover() -> list[tuple[str, str]]:
    """The phones of every configured adb server (`server_discovery`), phones on USB that no server
    holds (when libusb is usable; never raises) and every `host:port` entry of $AMC_ADB_TCP: those
    that answer with their model, the others with the reason they could not be reached (the user
    named them). USB phones are listed without connecting (connecting may raise the authorisation
    prompt). A malformed $AMC_ADB_TCP entry raises AmcError."""
    from .server_discovery import discover_server_phones

    entries = tcp_entries()
    found: list[tuple[str, str]] = discover_server_phones()
    served = {uri for uri, _ in found}
    for serial in list_usb_serials():
        if f"adb:{serial}" in served:  # a running server holds it: it is listed through the server
            continue
        found.append((f"adb:{serial}", "Android phone on USB (amc-mobile device-info adb:SERIAL for details)"))
    for entry in entries:
        # Short waits so that a silent address does not hold up the listing; the URI listed is the
        # user's address without these options.
        address, _, query = entry.partition("?")
        dev = AdbDevice.from_tcp_address(f"{address}?auth_timeout_s=5&connect_timeout_s=3" + (f"&{query}" if query else ""))
        try:
            info = dev.phone_info()
            found.append((dev.uri, f"{info.hardware}, Android {info.android_version}, {info.abi}, "
                                   f"{len(info.cores)} cores"))
        except AmcError as exc:
            found.append((dev.uri, str(exc)))  # "cannot reach ...", "did not accept the key ...": why
        finally:
            dev.close()
    return found
