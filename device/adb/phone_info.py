"""What the phone is: properties, CPU clusters, governors, temperatures; read in one shell round-trip.

`INFO_SCRIPT` prints sections between `@@name` marker lines (getprop, per-core cpufreq, thermal
zones, `dumpsys battery`, which tools exist); `parse_info` turns that text into a `PhoneInfo`.
`SNAPSHOT_SCRIPT` is the cheap subset taken around every batch (governors, current frequencies,
temperatures); `parse_snapshot` reads it. Both are plain POSIX sh (mksh/toybox on phones).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# `read` is a shell builtin: no process per file (a `$(cat f)` costs a fork+exec, ~50 of them per
# snapshot). The braces send the error of a missing file to /dev/null without failing anything.
_CPU_LOOP = (
    "for c in /sys/devices/system/cpu/cpu[0-9]*; do n=${c##*/cpu}; m=; g=; f=; o=1; "
    "{ read -r m < $c/cpufreq/cpuinfo_max_freq; } 2>/dev/null; { read -r g < $c/cpufreq/scaling_governor; } 2>/dev/null; "
    "{ read -r f < $c/cpufreq/scaling_cur_freq; } 2>/dev/null; { read -r o < $c/online; } 2>/dev/null; "
    "echo \"$n|$m|$g|$f|$o\"; done"
)
_THERMAL_LOOP = (
    "for z in /sys/class/thermal/thermal_zone*; do [ -d \"$z\" ] || continue; t=; v=; "
    "{ read -r t < $z/type; } 2>/dev/null; { read -r v < $z/temp; } 2>/dev/null; "
    "echo \"${z##*/thermal_zone}|$t|$v\"; done"
)
_BATTERY = "dumpsys battery 2>/dev/null"

INFO_SCRIPT = "; ".join([
    "echo @@props", "getprop",
    "echo @@cpus", _CPU_LOOP,
    "echo @@thermal", _THERMAL_LOOP,
    "echo @@battery", _BATTERY,
    "echo @@tools", "for t in taskset sha256sum kill sleep logcat; do command -v $t >/dev/null 2>&1 && echo $t; done",
    "echo @@end",
])

SNAPSHOT_SCRIPT = "; ".join([
    "echo @@cpus", _CPU_LOOP,
    "echo @@thermal", _THERMAL_LOOP,
    "echo @@battery", _BATTERY,
    "echo @@end",
])

_PROP_RE = re.compile(r"^\[(?P<k>[^\]]*)\]: \[(?P<v>.*)\]$")
# Thermal zones that measure the CPU (Qualcomm cpu-0-0-usr/cpuss-0, MediaTek mtktscpu, Exynos
# big/mid/little, Tensor BIG/MID/LITTLE, generic "cpu"...). "soc" alone is a battery gauge on Qualcomm.
_CPU_ZONE_RE = re.compile(r"cpu|cluster|big|little|mid|prime|gold|silver|tsens|soc_thermal|soc-thermal|apc", re.I)
_NOT_CPU_RE = re.compile(r"batt|skin|usb|charg|pa_therm|pa-therm|modem|xo|quiet|wifi|camera|gpu|ddr|npu|bms", re.I)


@dataclass
class Core:
    cpu: int
    max_khz: int | None
    governor: str | None
    cur_khz: int | None
    online: bool


@dataclass
class Cluster:
    name: str  # little, mid, big (mid1, mid2... with more than 3)
    cpus: list[int]
    max_khz: int | None

    @property
    def mask(self) -> str:
        return cpus_to_mask(self.cpus)


@dataclass
class ThermalZone:
    zone: int
    type: str
    temp_c: float | None


@dataclass
class Snapshot:
    """Governors, frequencies and temperatures at one moment."""

    cores: list[Core] = field(default_factory=list)
    zones: list[ThermalZone] = field(default_factory=list)
    battery: dict = field(default_factory=dict)

    @property
    def governors(self) -> dict[int, str | None]:
        return {c.cpu: c.governor for c in self.cores}

    @property
    def cur_khz(self) -> dict[int, int | None]:
        return {c.cpu: c.cur_khz for c in self.cores}

    @property
    def battery_temp_c(self) -> float | None:
        return battery_temp_c(self.battery)

    def temps(self) -> dict[str, float]:
        """{zone type: °C} (a repeated type gets its zone number appended)."""
        out: dict[str, float] = {}
        for z in self.zones:
            if z.temp_c is None:
                continue
            key = z.type or f"zone{z.zone}"
            if key in out:
                key = f"{key}#{z.zone}"
            out[key] = z.temp_c
        return out

    def max_cpu_temp_c(self) -> float | None:
        zones = cpu_zones(self.zones)
        vals = [z.temp_c for z in zones if z.temp_c is not None]
        return max(vals) if vals else None

    def to_dict(self) -> dict:
        return {
            "governors": {str(k): v for k, v in self.governors.items()},
            "cur_khz": {str(k): v for k, v in self.cur_khz.items()},
            "temps_c": self.temps(),
            "max_cpu_temp_c": self.max_cpu_temp_c(),
            "battery_temp_c": self.battery_temp_c,
        }


@dataclass
class PhoneInfo:
    props: dict[str, str]
    snapshot: Snapshot
    tools: list[str] = field(default_factory=list)

    @property
    def manufacturer(self) -> str:
        return self.props.get("ro.product.manufacturer") or self.props.get("ro.product.brand") or "unknown"

    @property
    def model(self) -> str:
        return self.props.get("ro.product.model") or self.props.get("ro.product.device") or "unknown"

    @property
    def soc(self) -> str:
        return self.props.get("ro.soc.model") or self.props.get("ro.board.platform") or self.props.get(
            "ro.hardware") or "unknown SoC"

    @property
    def android_version(self) -> str:
        return self.props.get("ro.build.version.release", "?")

    @property
    def sdk(self) -> str:
        return self.props.get("ro.build.version.sdk", "?")

    @property
    def abi(self) -> str:
        return self.props.get("ro.product.cpu.abi", "unknown")

    @property
    def hardware(self) -> str:
        return f"{self.manufacturer} {self.model} ({self.soc})"

    @property
    def cores(self) -> list[Core]:
        return self.snapshot.cores

    @property
    def clusters(self) -> list[Cluster]:
        return clusters_of(self.cores)

    def has(self, tool: str) -> bool:
        return tool in self.tools

    def to_dict(self) -> dict:
        return {
            "manufacturer": self.manufacturer,
            "model": self.model,
            "soc": self.soc,
            "android_version": self.android_version,
            "sdk": self.sdk,
            "abi": self.abi,
            "abilist": self.props.get("ro.product.cpu.abilist", ""),
            "build_fingerprint": self.props.get("ro.build.fingerprint", ""),
            "serialno": self.props.get("ro.serialno", ""),
            "clusters": [{"name": c.name, "cpus": c.cpus, "max_khz": c.max_khz, "mask": c.mask}
                         for c in self.clusters],
            "cores": [asdict(c) for c in self.cores],
            "thermal_zones": [asdict(z) for z in self.snapshot.zones],
            "battery": dict(self.snapshot.battery),
            "battery_temp_c": self.snapshot.battery_temp_c,
            "max_cpu_temp_c": self.snapshot.max_cpu_temp_c(),
            "tools": list(self.tools),
        }


# -- parsing ---------------------------------------------------------------------------------------


def split_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if line.startswith("@@") and re.fullmatch(r"@@\w+", line.strip()):
            current = line.strip()[2:]
            sections.setdefault(current, [])
            continue
        if current is not None:
            sections[current].append(line)
    return sections


def parse_props(lines: list[str]) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in lines:
        m = _PROP_RE.match(line.strip())
        if m:
            props[m.group("k")] = m.group("v")
    return props


def _int(s: str) -> int | None:
    s = s.strip()
    return int(s) if re.fullmatch(r"-?\d+", s) else None


def parse_cores(lines: list[str]) -> list[Core]:
    cores = []
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) != 5 or _int(parts[0]) is None:
            continue
        n, maxf, gov, cur, online = parts
        cores.append(Core(cpu=int(n), max_khz=_int(maxf), governor=gov.strip() or None, cur_khz=_int(cur),
                          online=online.strip() != "0"))
    return sorted(cores, key=lambda c: c.cpu)


def to_celsius(raw: int | float | None) -> float | None:
    """sysfs temperatures are millidegrees on most phones; a few report degrees or tenths."""
    if raw is None:
        return None
    v = float(raw)
    if abs(v) >= 1000:
        v /= 1000.0
    elif abs(v) >= 200:
        v /= 10.0
    if not -40.0 <= v <= 200.0:  # a disabled zone or a sentinel value
        return None
    return round(v, 3)


def parse_zones(lines: list[str]) -> list[ThermalZone]:
    zones = []
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) != 3 or _int(parts[0]) is None:
            continue
        zones.append(ThermalZone(zone=int(parts[0]), type=parts[1].strip(), temp_c=to_celsius(_int(parts[2]))))
    return sorted(zones, key=lambda z: z.zone)


_BATTERY_KEYS = {"temperature", "level", "status", "health", "ac powered", "usb powered", "wireless powered",
                 "voltage", "present"}


def parse_battery(lines: list[str]) -> dict[str, str]:
    """The `key: value` lines of `dumpsys battery` worth keeping."""
    out = {}
    for line in lines:
        key, sep, value = line.strip().partition(":")
        if sep and key.strip().lower() in _BATTERY_KEYS:
            out[key.strip()] = value.strip()
    return out


def battery_temp_c(battery: dict) -> float | None:
    """`dumpsys battery` reports the temperature in tenths of a degree."""
    v = _int(str(battery.get("temperature", "")))
    return None if v is None else v / 10.0


def parse_snapshot(text: str) -> Snapshot:
    s = split_sections(text)
    return Snapshot(cores=parse_cores(s.get("cpus", [])), zones=parse_zones(s.get("thermal", [])),
                    battery=parse_battery(s.get("battery", [])))


def parse_info(text: str) -> PhoneInfo:
    s = split_sections(text)
    if "props" not in s or "end" not in s:
        raise ValueError("the phone's answer to the info script is incomplete")
    return PhoneInfo(props=parse_props(s["props"]), snapshot=parse_snapshot(text),
                     tools=[t.strip() for t in s.get("tools", []) if t.strip()])


# -- derived ---------------------------------------------------------------------------------------


def cluster_names(n: int) -> list[str]:
    if n <= 0:
        return []
    if n == 1:
        return ["big"]
    if n == 2:
        return ["little", "big"]
    if n == 3:
        return ["little", "mid", "big"]
    return ["little"] + [f"mid{i}" for i in range(1, n - 1)] + ["big"]


def clusters_of(cores: list[Core]) -> list[Cluster]:
    """Cores grouped by cpuinfo_max_freq, slowest first (little, mid, big); cores without one last."""
    freqs = sorted({c.max_khz for c in cores if c.max_khz})
    names = cluster_names(len(freqs))
    out = [Cluster(name, [c.cpu for c in cores if c.max_khz == f], f) for name, f in zip(names, freqs)]
    unknown = [c.cpu for c in cores if not c.max_khz]
    if unknown:
        out.append(Cluster("unknown", unknown, None))
    return out


def fastest_cluster(cores: list[Core]) -> Cluster | None:
    known = [c for c in clusters_of(cores) if c.max_khz]
    return known[-1] if known else None


def cpus_to_mask(cpus) -> str:
    return format(sum(1 << int(c) for c in cpus), "x") if cpus else "0"


def mask_to_cpus(mask: str) -> list[int]:
    value = int(mask, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def cpu_zones(zones: list[ThermalZone]) -> list[ThermalZone]:
    """The zones that measure the CPU; when none is recognisable, every zone that is not obviously
    something else (battery, skin, modem...)."""
    found = [z for z in zones if z.temp_c is not None and _CPU_ZONE_RE.search(z.type) and not _NOT_CPU_RE.search(z.type)]
    if found:
        return found
    return [z for z in zones if z.temp_c is not None and not _NOT_CPU_RE.search(z.type)]
