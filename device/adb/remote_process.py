"""A command run in the background on a phone and supervised from here, knowing nothing of runners.

`run_in_background` starts the command under a subshell that writes its PID, stdout, stderr and
exit status to files of its batch folder (`FOLDER/TAG.pid|.out|.err|.rc`); the same shell
round-trip then waits on the phone (up to a few seconds, `window_s`) for the exit status, and the
next polls likewise until the deadline. Past it the command is killed by its PID (SIGTERM, then
SIGKILL), only when /proc/PID/cmdline still names the batch folder (never a recycled PID), and
what it printed before still counts. With `on_stdout`, each poll while it runs also brings back
the complete stdout lines printed since the last poll (`tail -c +N`), so a caller has them before
the connection can drop.

Sessions: every `AdbDevice` runs in its own folder `RUNS/HOST-PID-TOKEN`; `clean_stale_sessions`
kills the runners and removes the folders that sessions of this host left behind (a lost
connection, a killed process) and warns about runners of other live sessions.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable

from device.errors import AmcError

from .connection import AdbConnection, q
from .server_connection import ServerConnection

log = logging.getLogger("device.adb")

_SIGNALS = {int(s) for s in signal.Signals}
_OUT_MARK, _ERR_MARK, _END_MARK, _PART_MARK = "@@AMC_OUT@@", "@@AMC_ERR@@", "@@AMC_END@@", "@@AMC_PART"


@dataclass
class RemoteRun:
    """How a background command ended: its outputs, exit status (None: timed out and killed; a
    signal is negative, as with subprocess) and PID."""

    stdout: str
    stderr: str
    returncode: int | None
    pid: int | None


def run_in_background(conn: AdbConnection | ServerConnection, folder: str, tag: str, command: str,
                      timeout_s: float, *, window_s: float, uri: str, name: str, what: str,
                      on_stdout: Callable[[str], None] | None = None) -> RemoteRun:
    """Run `command` in the background on the phone (files `folder/tag.*`); wait for it until
    `timeout_s`, then kill it by PID. Never raises for the command's failure; raises
    AdbConnectionLost when the phone goes away. `on_stdout` gets complete stdout lines while it
    runs (each once). `name` (the program) and `what` (the job) word the messages."""
    base = f"{folder}/{tag}"
    out, err, rc, pid = (q(base + s) for s in (".out", ".err", ".rc", ".pid"))
    launch = (f"( trap '' HUP; {command} >{out} 2>{err} </dev/null & echo $! >{pid}; wait $!; "
              f"echo $? >{rc}.tmp; mv {rc}.tmp {rc} ) >/dev/null 2>&1 </dev/null & ")
    deadline = time.monotonic() + timeout_s
    stream = _OutputTail() if on_stdout is not None else None

    def poll(script: str) -> _PollStatus:
        text, _ = conn.run(script, timeout_s=window_s + 30, what=what)
        status = _parse_poll(text)
        if stream is not None and status.rc is None and status.partial is not None:
            lines = stream.feed(*status.partial)
            if lines:
                on_stdout(lines)
        return status

    status = poll(launch + _poll_script(base, min(window_s, timeout_s), stream))
    while status.rc is None and time.monotonic() < deadline:
        status = poll(_poll_script(base, min(window_s, max(0.05, deadline - time.monotonic())), stream))
    timed_out = status.rc is None
    if timed_out:
        text, _ = conn.run(_kill_script(base, folder), timeout_s=30, what=f"killing the hung {name}")
        status = _parse_poll(text)
        log.warning("%s: %s did not finish within %.0f s; killed pid %s", uri, name, timeout_s, status.pid)
    returncode = None if timed_out else status.rc
    if returncode is not None and returncode > 128 and returncode - 128 in _SIGNALS:
        returncode = -(returncode - 128)  # the shell's 128+N for a command killed by signal N
    return RemoteRun(status.stdout, status.stderr, returncode, status.pid)


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


def _kill_script(base: str, folder: str) -> str:
    """Kill the command by the PID it was started with (SIGTERM, then SIGKILL after 2 s), only if
    /proc/PID/cmdline still names the batch folder (never a recycled PID)."""
    pid, rc, d = q(base + ".pid"), q(base + ".rc"), q(folder + "/")
    ours = f"[ -n \"$p\" ] && grep -qF {d} /proc/$p/cmdline 2>/dev/null"
    return (f"p=$(cat {pid} 2>/dev/null); if {ours}; then kill $p 2>/dev/null; fi; "
            f"i=0; while [ ! -f {rc} ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; "
            f"if [ ! -f {rc} ] && {ours}; then kill -9 $p 2>/dev/null; fi; "
            f"i=0; while [ ! -f {rc} ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; "
            + _report_script(base))


def _report_script(base: str, offset: int | None = None) -> str:
    """The command's state; once it is done its stdout and stderr; with `offset`, while it runs, its
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


@dataclass
class _PollStatus:
    rc: int | None
    pid: int | None
    stdout: str
    stderr: str
    partial: tuple[int, str] | None = None  # (byte offset, stdout from there) while running


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
    """The command's stdout as it grows, polled in pieces: hands out each complete line once."""

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


# -- sessions --------------------------------------------------------------------------------------


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


def new_session_name() -> str:
    """`HOST-PID-TOKEN`: whose folder it is, so a later session can tell whether its owner is gone."""
    return f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_stale_sessions(conn: AdbConnection | ServerConnection, uri: str, runs_dir: str, live: set[str]) -> None:
    """Kill runners and remove folders under `runs_dir` left by sessions of this host that are gone
    (not in `live`, their process dead); warn about runners of other live sessions."""
    script = (f"for d in {q(runs_dir)}/*; do [ -d \"$d\" ] || continue; echo \"@@s ${{d##*/}}\"; "
              f"for p in \"$d\"/*/*.pid; do [ -f \"$p\" ] || continue; pid=$(cat \"$p\"); "
              f"[ -n \"$pid\" ] && grep -qF \"$d/\" /proc/$pid/cmdline 2>/dev/null && echo \"alive $pid\"; "
              f"done; done")
    out, _ = conn.run(script, what="looking for leftover runs")
    sessions: dict[str, list[int]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@@s "):
            current = line[4:].strip()
            sessions[current] = []
        elif line.startswith("alive ") and current is not None:
            sessions[current].append(int(line.split()[1]))
    me_tag = _host_tag()
    for name, pids in sessions.items():
        if name in live:
            continue
        m = re.fullmatch(r"(?P<host>.+)-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)", name)
        mine = bool(m) and m.group("host") == me_tag
        owner_gone = mine and (int(m.group("pid")) == os.getpid() or not _pid_alive(int(m.group("pid"))))
        if not owner_gone:
            if pids:
                log.warning("%s: another measurement seems to be running on the phone (pids %s, session %s); "
                            "results may be disturbed", uri, pids, name)
            continue
        kill = " ".join(f"kill -9 {int(p)} 2>/dev/null;" for p in pids)
        conn.run(f"{kill} rm -rf {q(runs_dir + '/' + name)}", what="removing a leftover run")
        if pids:
            log.warning("%s: killed runner(s) %s left by an earlier session (%s)", uri, pids, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
