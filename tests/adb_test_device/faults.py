"""Fault injection of the test device: which failures are armed (``Faults``) and when each one fires.

The services ask ``FaultState`` at the moment a fault could apply (a push starts, a shell command
starts); one-shot faults disarm themselves as they are taken.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, fields


@dataclass
class Faults:
    """Failures the device injects. Each one-shot fault clears itself once it has fired.

    - ``drop_push_after_bytes``: during the next sync SEND, once this many file bytes have arrived the
      device resets the TCP connection (RST) and deletes the partial file, as adbd does on a failed push.
    - ``drop_after_shell_commands``: K; the K-th shell command (counted from when the fault is set)
      runs and its output and CLSE are delivered; once the host has answered the CLSE the device
      resets the connection (RST), so the next request fails at once (ConnectionResetError).
    - ``hang_program``: a basename (e.g. ``"et_bench"``). While set, every shell command that runs a
      program with that basename runs a stand-in with the same name instead, which takes the same
      arguments and sleeps until killed (SIGTERM/SIGKILL via ``kill PID`` from another shell works;
      its PID is what ``$!``, ``echo $$; exec ...``, ``pgrep`` would give). Not one-shot.
    """

    drop_push_after_bytes: int | None = None
    drop_after_shell_commands: int | None = None
    hang_program: str | None = None


class FaultState:
    """The armed ``Faults`` of one device and the shell-command count behind ``drop_after_shell_commands``.

    ``lock`` is the device's (re-entrant) lock, so a fault set from a test and one taken by a service
    thread never interleave with the device's other bookkeeping.
    """

    def __init__(self, lock: threading.RLock, faults: Faults | None = None):
        self._lock = lock
        self.faults = faults or Faults()
        self._shell_counter = 0  # shell commands since drop_after_shell_commands was last set

    def set(self, **kwargs) -> None:
        """Set (or with None, clear) faults by name; see :class:`Faults`."""
        names = {f.name for f in fields(Faults)}
        with self._lock:
            for key, value in kwargs.items():
                if key not in names:
                    raise TypeError(f"unknown fault {key!r}; known: {sorted(names)}")
                setattr(self.faults, key, value)
                if key == "drop_after_shell_commands":
                    self._shell_counter = 0

    def clear(self) -> None:
        with self._lock:
            self.faults = Faults()

    def next_shell_command(self) -> bool:
        """Count a shell command; True if the connection must drop once it has finished."""
        with self._lock:
            k = self.faults.drop_after_shell_commands
            if k is None:
                return False
            self._shell_counter += 1
            if self._shell_counter >= k:
                self.faults.drop_after_shell_commands = None
                self._shell_counter = 0
                return True
            return False

    def take_push(self) -> int | None:
        """The byte count at which this push must drop the connection (None: no fault); disarms it."""
        with self._lock:
            n = self.faults.drop_push_after_bytes
            self.faults.drop_push_after_bytes = None
            return n

    def hang_rewrite(self, host_cmd: str, sandbox) -> str:
        """`host_cmd` with the hung program (if one is set) replaced by the sandbox's stand-in for it."""
        hang = self.faults.hang_program
        if hang:
            host_cmd = _hang_rewrite(host_cmd, hang, sandbox.hang_stub(hang))
        return host_cmd


def _hang_rewrite(command: str, program: str, stub: str) -> str:
    """Replace `program` where it is run (command position) by the hang stub."""
    name = re.escape(os.path.basename(program))
    # A word ending in /NAME or equal to NAME, at the start of a simple command: after start,
    # ; & | ( ` $( && || or one of a few prefix commands (exec, nohup, taskset MASK, ...).
    lead = (r"(?:^|[;&|(`]|\$\(|\bthen|\bdo|\belse|\bexec|\bnohup|\btime|\bnice(?:\s+-n\s*-?\d+)?"
            r"|\btaskset(?:\s+-[a-z]+)*\s+\S+|\btimeout(?:\s+-\S+)*\s+\S+|\benv(?:\s+\w+=\S*)*"
            r"|-c\s+['\"]|\b\w+=\S*\s)")
    pattern = re.compile(r"(?P<lead>" + lead + r")(?P<ws>\s*)(?P<word>[^\s;&|()`'\"<>]*/)?" + name +
                         r"(?=$|[\s;&|()`'\"<>])")
    return pattern.sub(lambda m: m.group("lead") + m.group("ws") + stub, command)
