"""Search checkpoints: tensors in .pt files (loaded with weights_only=True), everything else in JSON.

Layout: `<run>/checkpoints/ep000020/{agent.pt, replay.pt, state.json}` where 20 = episodes done.

- written atomically: into `ep000020.tmp/`, `state.json` last (with the SHA-256 of both .pt files),
  then renamed; the two newest complete checkpoints are kept, older ones deleted.
- `load_latest` verifies the newest: unreadable JSON, a checksum mismatch or a .pt that
  does not load is an AmcError that names the previous (intact) checkpoint; nothing is deleted.
- RNG states of python `random`, numpy's global generator and torch are saved and restored with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write

from .agent import DDPGAgent

FORMAT = "amc-mobile-search-checkpoint/1"
DIR = "checkpoints"
KEEP = 2
_NAME = re.compile(r"^ep(\d{6})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_states() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }


def set_rng_states(d: dict, torch_state: torch.Tensor | None) -> None:
    v, state, gauss = d["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (episode, folder), oldest first."""
    root = Path(run_dir) / DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def save(run_dir: Path, episode: int, agent: DDPGAgent, loop: dict) -> Path:
    """Write the checkpoint after `episode` completed episodes; returns its folder."""
    root = Path(run_dir) / DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ep{episode:06d}"
    tmp = root / f"ep{episode:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({**agent.tensors(), "torch_rng": torch.get_rng_state()}, tmp / "agent.pt")
    torch.save(agent.buffer.state_dict(), tmp / "replay.pt")
    state = {
        "format": FORMAT,
        "episode": episode,
        "agent": agent.meta(),
        "loop": loop,
        "rng": rng_states(),
        "sha256": {name: _sha256(tmp / name) for name in ("agent.pt", "replay.pt")},
    }
    atomic_write(tmp / "state.json", json.dumps(state, indent=1))
    if final.exists():  # a stale one from beyond an earlier resume point
        stale = root / f"ep{episode:06d}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for _, old in checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read(folder: Path) -> tuple[dict, dict, dict]:
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise ValueError("state.json is missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"state.json is unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"state.json is not a {FORMAT} file")
    tensors = {}
    for name, digest in state.get("sha256", {}).items():
        path = folder / name
        if not path.exists():
            raise ValueError(f"{name} is missing")
        if _sha256(path) != digest:
            raise ValueError(f"{name} does not match its checksum (truncated or modified)")
        try:
            tensors[name] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{name} does not load ({str(exc).splitlines()[0][:120]})") from None
    if set(tensors) != {"agent.pt", "replay.pt"}:
        raise ValueError("agent.pt or replay.pt is not listed in state.json")
    return state, tensors["agent.pt"], tensors["replay.pt"]


def load_latest(run_dir: Path, agent: DDPGAgent) -> dict:
    """Restore `agent` and the global RNGs from the newest checkpoint; returns its state.json dict."""
    found = checkpoints(run_dir)
    if not found:
        raise AmcError(f"{run_dir} has no checkpoint to resume from (none in {Path(run_dir) / DIR}); "
                       f"start a new run without --resume")
    episode, folder = found[-1]
    try:
        state, agent_t, replay_t = _read(folder)
        agent.load_tensors(agent_t)
        agent.buffer.load_state_dict(replay_t)
        agent.load_meta(state["agent"])
        set_rng_states(state["rng"], agent_t.get("torch_rng"))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        if len(found) > 1:
            prev_ep, prev = found[-2]
            hint = (f"the previous checkpoint {prev} (episode {prev_ep}) is kept: delete {folder} and rerun "
                    f"--resume to continue from episode {prev_ep}")
        else:
            hint = "there is no earlier checkpoint: start a new run"
        raise AmcError(f"checkpoint {folder} is corrupt: {exc}; {hint}") from exc
    return state
