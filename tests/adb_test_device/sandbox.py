"""The fake phone's filesystem: a sandbox folder that stands in for ``/``.

Layout (all under the sandbox root):

- ``data/local/tmp/``: where runners and models get pushed (the shell's TMPDIR)
- ``sdcard/``
- ``sys/devices/system/cpu/``: ``cpuN/cpufreq -> ../cpufreq/policyM`` (one policy per cluster, as on
  real phones), ``cpuinfo_max_freq``/``scaling_governor``/... per policy, ``online``/``possible``
- ``sys/class/thermal/thermal_zoneN/{type,temp}`` (millidegrees C)
- ``system/bin/``: ``getprop``, ``dumpsys``, ``taskset`` (folds the phone's CPU numbers onto the host's)
  and ``sh``
- ``.amcsim/``: the device's own state (``build.prop``, dumpsys outputs, injected-hang stubs)

Shell commands run on the host with ``/bin/sh -c``. Paths in the command text whose first component
is a phone directory (``/data``, ``/sdcard``, ``/sys``, ``/system``, ... and any other top-level entry
of the sandbox) are rewritten into the sandbox; host paths (``/bin``, ``/proc``, ``/dev``, ``/tmp``, ...)
are left alone. Output has the sandbox prefix rewritten back, so ``ls``/``find``/error messages
print phone paths. Sync (push/pull/stat/list) maps every path into the sandbox.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import stat
import sys
from dataclasses import dataclass, field

DEFAULT_PROPS: dict[str, str] = {
    "ro.product.name": "amcsim",
    "ro.product.model": "AMC Test Phone",
    "ro.product.device": "amcsim",
    "ro.product.brand": "amc",
    "ro.product.manufacturer": "AMC",
    "ro.product.cpu.abi": "arm64-v8a",
    "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
    "ro.soc.manufacturer": "AMC",
    "ro.soc.model": "SIM8000",
    "ro.board.platform": "amcsim",
    "ro.hardware": "amcsim",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.build.type": "userdebug",
    "ro.build.tags": "test-keys",
    "ro.build.id": "AMC1.0",
    "ro.build.fingerprint": "amc/amcsim/amcsim:14/AMC1.0/1:userdebug/test-keys",
    "ro.serialno": "AMCSIM0001",
    "ro.debuggable": "1",
    "ro.secure": "1",
    "sys.boot_completed": "1",
}

# (number of cores, cpuinfo_max_freq in kHz) per cluster, little to big.
DEFAULT_CPU_CLUSTERS: list[tuple[int, int]] = [(4, 1_800_000), (3, 2_400_000), (1, 3_000_000)]

# (type, temp in millidegrees C). A phone at rest: every CPU zone under the bridge's 45 °C thermal
# guard, so a batch never waits for it unless a test heats the phone up (``thermal_zones=`` or
# ``set_temperature``).
DEFAULT_THERMAL_ZONES: list[tuple[str, int]] = [
    ("cpu-0-0", 36_000), ("cpu-1-0", 37_000), ("cpu-2-0", 38_000),
    ("gpu", 39_500), ("battery", 31_000), ("skin-therm", 33_200),
]

DEFAULT_BATTERY: dict[str, str] = {
    "AC powered": "false",
    "USB powered": "true",
    "Wireless powered": "false",
    "Max charging current": "500000",
    "Max charging voltage": "5000000",
    "Charge counter": "3512000",
    "status": "2",
    "health": "2",
    "present": "true",
    "level": "87",
    "scale": "100",
    "voltage": "4213",
    "temperature": "312",
    "technology": "Li-ion",
}

# Top-level names that are always phone directories (rewritten into the sandbox in shell commands).
PHONE_ROOTS = {"data", "sdcard", "storage", "sys", "system", "vendor", "product", "odm", "apex",
               "system_ext", "mnt", "cache", "config", "acct", "metadata", "debug_ramdisk", ".amcsim"}
# Host directories a shell command needs as they are; never rewritten even if the sandbox has them.
HOST_ROOTS = {"bin", "sbin", "usr", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp",
              "run", "var", "opt", "home", "root", "srv", "boot", "media", "nix", "snap", "work"}

STATE_DIR = ".amcsim"


def _write(path: str, text: str, mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    if mode is not None:
        os.chmod(path, mode)


@dataclass
class PhoneLayout:
    props: dict[str, str] = field(default_factory=dict)
    cpu_clusters: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_CPU_CLUSTERS))
    thermal_zones: list[tuple[str, int]] = field(default_factory=lambda: list(DEFAULT_THERMAL_ZONES))
    battery: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_BATTERY))
    governor: str = "schedutil"


class Sandbox:
    """The sandbox folder, populated as a phone, plus phone<->host path translation."""

    def __init__(self, root: str | os.PathLike, layout: PhoneLayout):
        self.root = os.path.realpath(os.fspath(root))
        if not re.fullmatch(r"[\w./+@%:,=-]+", self.root):
            raise ValueError(f"sandbox path {self.root!r} must not contain spaces or shell metacharacters")
        self.layout = layout
        self.props = dict(DEFAULT_PROPS)
        self.props.update({str(k): str(v) for k, v in layout.props.items()})

    # -- building ---------------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, STATE_DIR)

    def populate(self) -> None:
        r = self.root
        for d in ("data/local/tmp", "data/misc/adb", "sdcard", "storage/emulated", "system/bin",
                  "system/xbin", "vendor/bin", STATE_DIR + "/dumpsys", STATE_DIR + "/hang"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        os.chmod(os.path.join(r, "data/local/tmp"), 0o771)
        self.write_props()
        self._populate_cpus()
        self._populate_thermal()
        self.write_battery(self.layout.battery)
        self._install_tools()

    def _populate_cpus(self) -> None:
        base = os.path.join(self.root, "sys/devices/system/cpu")
        n = sum(count for count, _ in self.layout.cpu_clusters)
        for name in ("online", "possible", "present"):
            _write(os.path.join(base, name), f"0-{n - 1}\n")
        _write(os.path.join(base, "offline"), "\n")
        first = 0
        for count, max_khz in self.layout.cpu_clusters:
            cpus = list(range(first, first + count))
            policy = os.path.join(base, "cpufreq", f"policy{first}")
            min_khz = min(300_000, max_khz)
            steps = sorted({min_khz, max_khz // 2, (max_khz * 3) // 4, max_khz})
            files = {
                "cpuinfo_max_freq": max_khz, "cpuinfo_min_freq": min_khz,
                "scaling_max_freq": max_khz, "scaling_min_freq": min_khz,
                "scaling_cur_freq": max_khz, "cpuinfo_cur_freq": max_khz,
                "scaling_governor": self.layout.governor,
                "scaling_available_governors": "performance powersave schedutil",
                "scaling_available_frequencies": " ".join(map(str, steps)),
                "related_cpus": " ".join(map(str, cpus)), "affected_cpus": " ".join(map(str, cpus)),
                "scaling_driver": "amcsim-cpufreq",
            }
            for fname, value in files.items():
                _write(os.path.join(policy, fname), f"{value}\n")
            for cpu in cpus:
                cdir = os.path.join(base, f"cpu{cpu}")
                os.makedirs(cdir, exist_ok=True)
                _write(os.path.join(cdir, "online"), "1\n")
                _write(os.path.join(cdir, "cpu_capacity"), f"{round(1024 * max_khz / self._max_khz())}\n")
                link = os.path.join(cdir, "cpufreq")
                if not os.path.lexists(link):
                    os.symlink(f"../cpufreq/policy{first}", link)
            first += count

    def _max_khz(self) -> int:
        return max(khz for _, khz in self.layout.cpu_clusters)

    def _populate_thermal(self) -> None:
        base = os.path.join(self.root, "sys/class/thermal")
        for i, (kind, temp) in enumerate(self.layout.thermal_zones):
            zone = os.path.join(base, f"thermal_zone{i}")
            _write(os.path.join(zone, "type"), f"{kind}\n")
            _write(os.path.join(zone, "temp"), f"{int(temp)}\n")
            _write(os.path.join(zone, "mode"), "enabled\n")

    def write_props(self) -> None:
        lines = [f"{k}={v}" for k, v in sorted(self.props.items())]
        _write(os.path.join(self.state_dir, "build.prop"), "\n".join(lines) + "\n")

    def write_battery(self, battery: dict[str, str]) -> None:
        lines = ["Current Battery Service state:"] + [f"  {k}: {v}" for k, v in battery.items()]
        _write(os.path.join(self.state_dir, "dumpsys", "battery"), "\n".join(lines) + "\n")

    def set_temperature(self, zone: int | str, millideg: int) -> None:
        index = zone if isinstance(zone, int) else [t for t, _ in self.layout.thermal_zones].index(zone)
        _write(os.path.join(self.root, f"sys/class/thermal/thermal_zone{index}/temp"), f"{int(millideg)}\n")

    def _install_tools(self) -> None:
        state = self.state_dir
        q = shlex.quote
        getprop = f"""#!/bin/sh
# amcsim getprop: reads {STATE_DIR}/build.prop (key=value lines)
f={q(os.path.join(state, "build.prop"))}
if [ $# -eq 0 ]; then
  sort "$f" | while IFS= read -r line; do
    [ -n "$line" ] && printf '[%s]: [%s]\\n' "${{line%%=*}}" "${{line#*=}}"
  done
  exit 0
fi
awk -v k="$1" -v d="$2" 'BEGIN{{found=0}} index($0, k "=") == 1 {{ print substr($0, length(k) + 2); found=1; exit }} END{{ if (!found) print d }}' "$f"
"""
        _write(os.path.join(self.root, "system/bin/getprop"), getprop, 0o755)
        dumpsys = f"""#!/bin/sh
# amcsim dumpsys: prints {STATE_DIR}/dumpsys/<service>
d={q(os.path.join(state, "dumpsys"))}
if [ $# -eq 0 ] || [ "$1" = "-l" ]; then
  echo "Currently running services:"; for s in "$d"/*; do echo "  ${{s##*/}}"; done; exit 0
fi
if [ -f "$d/$1" ]; then cat "$d/$1"; else echo "Can't find service: $1"; fi
"""
        _write(os.path.join(self.root, "system/bin/dumpsys"), dumpsys, 0o755)
        taskset = f"""#!{_python_for_shebang()} -S
# amcsim taskset: the phone has more CPUs than the host, so phone CPU i runs on host CPU
# (i mod host count); then it hands over to the real taskset / execs the command.
import os, shutil, sys
host = sorted(os.sched_getaffinity(0))
def fold_mask(text):
    mask = int(text, 16)
    cpus = {{host[i % len(host)] for i in range(mask.bit_length()) if mask >> i & 1}}
    return format(sum(1 << c for c in cpus), "x")
def fold_list(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return ",".join(str(host[i % len(host)]) for i in sorted(cpus))
args = sys.argv[1:]
real = shutil.which("taskset", path="/usr/bin:/bin:/usr/sbin:/sbin")
opts = []
while args and args[0].startswith("-") and args[0] != "--":
    opts.append(args.pop(0))
flags = "".join(o.lstrip("-") for o in opts)
if "p" in flags and len(args) == 1:  # query: taskset -p PID
    os.execv(real, [real] + opts + args)
if not args:
    os.execv(real, [real] + opts)
args[0] = fold_list(args[0]) if "c" in flags else fold_mask(args[0])
os.execv(real, [real] + opts + args)
"""
        _write(os.path.join(self.root, "system/bin/taskset"), taskset, 0o755)
        sh_link = os.path.join(self.root, "system/bin/sh")
        if not os.path.lexists(sh_link):
            os.symlink("/bin/sh", sh_link)

    def hang_stub(self, program: str) -> str:
        """A host path to an executable named `program` that sleeps until it is killed."""
        name = posixpath.basename(program) or "hang"
        path = os.path.join(self.state_dir, "hang", name)
        if not os.path.exists(path):
            _write(path, f"#!{_python_for_shebang()} -S\n# amcsim: injected hang; sleeps until killed\n"
                         "import signal\nwhile True:\n    signal.pause()\n", 0o755)
        return path

    # -- translation ------------------------------------------------------------------------------

    def phone_roots(self) -> set[str]:
        try:
            present = {e for e in os.listdir(self.root)}
        except OSError:
            present = set()
        return (PHONE_ROOTS | present) - HOST_ROOTS

    def to_host(self, phone_path: str) -> str:
        """An absolute phone path -> the sandbox path (``..`` cannot climb out of the sandbox)."""
        norm = posixpath.normpath("/" + phone_path.lstrip("/"))
        if norm == "/":
            return self.root
        return self.root + norm

    def translate_command(self, command: str) -> str:
        roots = sorted(self.phone_roots(), key=len, reverse=True)
        if not roots:
            return command
        pattern = re.compile(r"(?<![\w.~/$})\-])/(" + "|".join(map(re.escape, roots)) + r")(?=/|$|[^\w.\-])")
        return pattern.sub(lambda m: self.root + m.group(0), command)

    def output_rewriter(self) -> "OutputRewriter":
        return OutputRewriter(self.root.encode())


class OutputRewriter:
    """Streams bytes, replacing ``<root>/x`` by ``/x`` and a bare ``<root>`` by ``/``.

    Holds back only the tail of a chunk that could be the start of the sandbox prefix.
    """

    def __init__(self, root: bytes):
        self.root = root
        self.pending = b""
        self._re = re.compile(re.escape(root) + rb"(?:/|(?![\w.\-]))")

    def _replace(self, data: bytes) -> bytes:
        return self._re.sub(b"/", data)

    def feed(self, data: bytes) -> bytes:
        data = self.pending + data
        self.pending = b""
        # Keep back a suffix that is a prefix of root (possibly the whole root, waiting for the next byte).
        keep = 0
        for k in range(min(len(self.root), len(data)), 0, -1):
            if self.root.startswith(data[-k:]):
                keep = k
                break
        if keep:
            data, self.pending = data[:-keep], data[-keep:]
        return self._replace(data)

    def flush(self) -> bytes:
        data, self.pending = self.pending, b""
        return self._replace(data)


def _python_for_shebang() -> str:
    exe = sys.executable or "/usr/bin/python3"
    if len(exe) > 100 or " " in exe:
        exe = "/usr/bin/python3"
    return exe


def strtoul_mode(text: str) -> int:
    """The mode in ``SEND path,mode``: parsed like C's strtoul(s, NULL, 0)."""
    text = text.strip()
    if text.lower().startswith("0x"):
        return int(text, 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text, 8)
    return int(text, 10)


def mode_for_send(mode: int) -> int:
    """adbd copies the owner's permission bits to group and other (see do_send_v1)."""
    perms = mode & 0o777
    perms |= (perms >> 3) & 0o070
    perms |= (perms >> 3) & 0o007
    return perms


S_IFLNK = stat.S_IFLNK
