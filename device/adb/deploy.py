"""Put the benchmark runner on the phone: pick the binary for the phone's ABI, push it when its
sha256 differs from the phone's copy (`sha256sum` on the phone), chmod 755.

Runner binaries, by what the phone reports in `ro.product.cpu.abi`:

- `$AMC_ANDROID_RUNNER` (et_bench) or `$AMC_ANDROID_EXECUTOR_RUNNER` (stock runner), whatever the ABI;
- arm64-v8a: `build/android/et_bench` (android_bench/README.md, "Android arm64-v8a build");
- x86_64: `build/android-x86_64/et_bench`, else the host build `build/host/et_bench`. The host build
  only runs where the "phone" shares this machine's libraries: the ADB test device in tests/, not an
  emulator.

The stock ExecuTorch `executor_runner` (`runner="executor_runner"`): `build/android/executor_runner`.

When no local binary exists but the phone already has one at the remote path, that one is used as it
is (with a warning: its version cannot be checked). Otherwise `AmcError` says how to build one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AmcError
from ..files import sha256_file
from ..user_dirs import REPO_ROOT
from .connection import AdbConnection, q

log = logging.getLogger("device.adb")

REMOTE_DIR = "/data/local/tmp/amc_mobile"
ENV_RUNNER = "AMC_ANDROID_RUNNER"
ENV_EXECUTOR_RUNNER = "AMC_ANDROID_EXECUTOR_RUNNER"
RUNNERS = ("et_bench", "executor_runner")

_BUILD_HINT = {
    "et_bench": ("build et_bench for Android with the NDK as android_bench/README.md describes (section 'Android "
                 "arm64-v8a build'; it ends with build/android/et_bench), or set AMC_ANDROID_RUNNER=/path/to/et_bench"),
    "executor_runner": ("build ExecuTorch's executor_runner for Android (android_bench/README.md, 'With ExecuTorch's "
                        "stock executor_runner') and copy it to build/android/executor_runner, or set "
                        "AMC_ANDROID_EXECUTOR_RUNNER"),
}


@dataclass
class RunnerBinary:
    kind: str  # "et_bench" | "executor_runner"
    remote: str  # path on the phone
    local: Path | None  # None: the phone's copy is used as it is
    sha256: str | None
    pushed: bool = False

    def describe(self) -> str:
        src = str(self.local) if self.local else "already on the phone (unverified)"
        return f"{self.kind} at {self.remote} from {src}" + (" (pushed)" if self.pushed else "")


def remote_path(kind: str) -> str:
    return f"{REMOTE_DIR}/{kind}"


def local_candidates(kind: str, abi: str) -> list[Path]:
    """Where a runner for `abi` may be, in order of preference."""
    env = os.environ.get(ENV_RUNNER if kind == "et_bench" else ENV_EXECUTOR_RUNNER)
    if env:
        return [Path(env).expanduser()]
    build = REPO_ROOT / "build"
    if abi.startswith("arm64"):
        return [build / "android" / kind]
    if abi == "x86_64":
        out = [build / "android-x86_64" / kind]
        if kind == "et_bench":
            out.append(build / "host" / "et_bench")
        return out
    return []


def find_local_runner(kind: str, abi: str) -> Path | None:
    if kind not in RUNNERS:
        raise AmcError(f"unknown runner {kind!r}: use one of {', '.join(RUNNERS)}")
    env_name = ENV_RUNNER if kind == "et_bench" else ENV_EXECUTOR_RUNNER
    for p in local_candidates(kind, abi):
        if p.is_file():
            return p
        if os.environ.get(env_name):
            raise AmcError(f"{env_name}={os.environ[env_name]} is not a file: fix the variable or unset it")
    return None


def missing_runner_error(kind: str, abi: str, uri: str) -> AmcError:
    where = ", ".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)
                      for p in local_candidates(kind, abi)) or "none for this ABI"
    return AmcError(f"no {kind} runner for {uri} (ABI {abi}; looked for {where}, and none is on the phone at "
                    f"{remote_path(kind)}): {_BUILD_HINT[kind]}")


def remote_sha256(conn: AdbConnection, remote: str) -> str | None:
    out, rc = conn.run(f"if [ -f {q(remote)} ]; then sha256sum {q(remote)} 2>/dev/null || toybox sha256sum {q(remote)}; "
                       f"fi", what="checksum of the runner")
    token = out.strip().split()[0] if out.strip() else ""
    return token.lower() if len(token) == 64 else None


def remote_exists(conn: AdbConnection, remote: str) -> bool:
    out, _ = conn.run(f"[ -x {q(remote)} ] && echo yes || echo no", what="runner check")
    return out.strip().endswith("yes")


def ensure_runner(conn: AdbConnection, kind: str, abi: str) -> RunnerBinary:
    """The runner on the phone, pushed (to a temporary name, then renamed) when missing or different."""
    remote = remote_path(kind)
    local = find_local_runner(kind, abi)
    if local is None:
        if remote_exists(conn, remote):
            log.warning("%s: no local %s build for ABI %s; using the one already on the phone at %s",
                        conn.uri, kind, abi, remote)
            return RunnerBinary(kind, remote, None, None)
        raise missing_runner_error(kind, abi, conn.uri)
    digest = sha256_file(local)
    if remote_sha256(conn, remote) == digest:
        conn.run(f"[ -x {q(remote)} ] || chmod 755 {q(remote)}", what="chmod of the runner")
        return RunnerBinary(kind, remote, local, digest)
    tmp = remote + ".part"
    conn.run(f"mkdir -p {q(REMOTE_DIR)} && rm -f {q(tmp)}", what="runner folder", check=True)
    log.info("%s: pushing %s (%d bytes) to %s", conn.uri, local, local.stat().st_size, remote)
    conn.push(local, tmp, mode=0o755, what=f"push of the runner {local.name}")
    conn.run(f"chmod 755 {q(tmp)} && mv -f {q(tmp)} {q(remote)}", what="runner install", check=True)
    if remote_sha256(conn, remote) not in (digest, None):
        raise AmcError(f"the runner pushed to {conn.uri}:{remote} does not match {local} (sha256): storage full?")
    return RunnerBinary(kind, remote, local, digest, pushed=True)


def runner_status(conn: AdbConnection, kind: str, abi: str) -> dict:
    """What `device-info` says of the runner: where it is on the phone, the local binary, and whether
    the phone's copy is that binary."""
    remote = remote_path(kind)
    status = {"kind": kind, "remote": remote}
    try:
        local = find_local_runner(kind, abi)
    except AmcError as exc:
        return {**status, "local": f"error: {exc}"}
    on_phone = remote_sha256(conn, remote)
    status["local"] = str(local) if local else None
    status["on_phone"] = bool(on_phone)
    if local is not None:
        status["up_to_date"] = on_phone == sha256_file(local)
    elif not on_phone:
        status["local"] = "missing: see android_bench/README.md"
    return status
