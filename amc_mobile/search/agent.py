"""DDPG, CleanRL-style: a small Actor, a small Critic, a replay buffer, truncated-normal noise, and one
agent that owns them with an explicit soft update and explicit `state_dict` / `load_state_dict`.

AMC's variant (mit-han-lab/amc, lib/agent.py):
- actor s -> 300 -> 300 -> 1 (sigmoid); critic fc(s) + fc(a) -> 300 -> 300 -> 1
- every transition of an episode carries the episode's final reward; a moving average of the
  sampled batch's mean reward (alpha 0.5) is subtracted before the TD target
- warm-up actions U[0, 1]; afterwards actor output + truncated normal noise on [0, 1]

Randomness: network initialisation uses torch's global generator (seed it before building the
agent); everything else (warm-up actions, noise, minibatches) uses the agent's own numpy Generator,
whose state is part of `state_dict`, so a restored agent continues bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DDPGConfig


@contextlib.contextmanager
def single_thread():
    """Run tiny ops on one thread: on a busy machine, intra-op threads make a 300-300 MLP step ~15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fanin_init(layer: nn.Linear) -> None:
    bound = 1.0 / np.sqrt(layer.weight.shape[1])
    nn.init.uniform_(layer.weight, -bound, bound)


class Actor(nn.Module):
    def __init__(self, n_states: int, hidden1: int = 300, hidden2: int = 300, init_w: float = 3e-3):
        super().__init__()
        self.fc1 = nn.Linear(n_states, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 1)
        _fanin_init(self.fc1)
        _fanin_init(self.fc2)
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc3(F.relu(self.fc2(F.relu(self.fc1(s))))))


class Critic(nn.Module):
    def __init__(self, n_states: int, hidden1: int = 300, hidden2: int = 300, init_w: float = 3e-3):
        super().__init__()
        self.fc_s = nn.Linear(n_states, hidden1)
        self.fc_a = nn.Linear(1, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 1)
        _fanin_init(self.fc_s)
        _fanin_init(self.fc_a)
        _fanin_init(self.fc2)
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_s(s) + self.fc_a(a))
        return self.fc3(F.relu(self.fc2(h)))


class ReplayBuffer:
    """A ring buffer of (s, a, r, s', done), sampled uniformly with replacement."""

    def __init__(self, capacity: int, n_states: int):
        self.capacity = int(capacity)
        self.s = np.zeros((self.capacity, n_states), dtype=np.float32)
        self.a = np.zeros((self.capacity, 1), dtype=np.float32)
        self.r = np.zeros((self.capacity, 1), dtype=np.float32)
        self.s2 = np.zeros((self.capacity, n_states), dtype=np.float32)
        self.done = np.zeros((self.capacity, 1), dtype=np.float32)
        self.ptr = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, s, a: float, r: float, s2, done: bool) -> None:
        i = self.ptr
        self.s[i], self.a[i, 0], self.r[i, 0], self.s2[i], self.done[i, 0] = s, a, r, s2, float(done)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, size=batch)
        return tuple(torch.from_numpy(x[idx]) for x in (self.s, self.a, self.r, self.s2, self.done))

    def state_dict(self) -> dict:
        n = self.size
        return {"s": torch.from_numpy(self.s[:n].copy()), "a": torch.from_numpy(self.a[:n].copy()),
                "r": torch.from_numpy(self.r[:n].copy()), "s2": torch.from_numpy(self.s2[:n].copy()),
                "done": torch.from_numpy(self.done[:n].copy()), "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, d: dict) -> None:
        n = int(d["size"])
        if n > self.capacity or tuple(d["s"].shape) != (n, self.s.shape[1]):
            raise ValueError(f"replay buffer of {n} transitions with states {tuple(d['s'].shape)} does not fit "
                             f"capacity {self.capacity} x {self.s.shape[1]}")
        for name in ("s", "a", "r", "s2", "done"):
            getattr(self, name)[:n] = d[name].numpy()
        self.ptr, self.size = int(d["ptr"]), n


class TruncatedNormalNoise:
    """x ~ N(mu, sigma) conditioned on [low, high], by rejection (sigma <= 0.5 on [0, 1] accepts often)."""

    def __init__(self, low: float = 0.0, high: float = 1.0):
        self.low, self.high = low, high

    def __call__(self, rng: np.random.Generator, mu: float, sigma: float) -> float:
        mu = min(max(float(mu), self.low), self.high)
        if sigma <= 0:
            return mu
        for _ in range(1000):
            x = rng.normal(mu, sigma)
            if self.low <= x <= self.high:
                return float(x)
        return float(rng.uniform(self.low, self.high))  # sigma huge relative to the interval


class DDPGAgent:
    def __init__(self, n_states: int, n_layers: int, config: DDPGConfig | None = None, seed: int = 0):
        cfg = config or DDPGConfig()
        self.cfg = cfg
        self.n_states = n_states
        self.actor = Actor(n_states, cfg.hidden1, cfg.hidden2, cfg.init_w)
        self.actor_target = Actor(n_states, cfg.hidden1, cfg.hidden2, cfg.init_w)
        self.critic = Critic(n_states, cfg.hidden1, cfg.hidden2, cfg.init_w)
        self.critic_target = Critic(n_states, cfg.hidden1, cfg.hidden2, cfg.init_w)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.buffer = ReplayBuffer(cfg.replay_per_layer * n_layers, n_states)
        self.noise = TruncatedNormalNoise(0.0, 1.0)
        self.rng = np.random.default_rng(seed)
        self.baseline: float | None = None  # moving average of the sampled rewards
        self.updates = 0

    # -- acting
    def random_action(self) -> float:
        return float(self.rng.uniform(0.0, 1.0))

    @torch.no_grad()
    def act(self, state: np.ndarray) -> float:
        with single_thread():
            return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    def select_action(self, state: np.ndarray, sigma: float) -> float:
        return self.noise(self.rng, self.act(state), sigma)

    def sigma(self, episode: int, warmup: int) -> float:
        """Exploration sigma of `episode` (0-based): init_noise * decay^(episode - warmup)."""
        return self.cfg.init_noise * self.cfg.noise_decay ** max(0, episode - warmup)

    # -- learning
    def observe(self, s, a: float, r: float, s2, done: bool) -> None:
        self.buffer.add(s, a, r, s2, done)

    def update(self) -> tuple[float, float]:
        """One DDPG step on a minibatch; returns (critic loss, actor loss)."""
        with single_thread():
            return self._update()

    def _update(self) -> tuple[float, float]:
        cfg = self.cfg
        s, a, r, s2, done = self.buffer.sample(self.rng, cfg.batch_size)
        mean_r = float(r.mean())
        self.baseline = mean_r if self.baseline is None else self.baseline + cfg.baseline_alpha * (mean_r - self.baseline)
        r = r - self.baseline
        with torch.no_grad():
            q_next = self.critic_target(s2, self.actor_target(s2))
            target = r + cfg.discount * (1.0 - done) * q_next
        critic_loss = F.mse_loss(self.critic(s, a), target)
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()

        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()

        with torch.no_grad():
            for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), target_net.parameters()):
                    tp.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)
        self.updates += 1
        return critic_loss.item(), actor_loss.item()

    # -- persistence: tensors for .pt (weights_only), plain values for JSON
    def tensors(self) -> dict:
        return {
            "actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
            "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "actor_optim": self.actor_optim.state_dict(), "critic_optim": self.critic_optim.state_dict(),
        }

    def load_tensors(self, d: dict) -> None:
        d = copy.deepcopy(d)  # optimizers keep the given state tensors: never share them with the source
        for name in ("actor", "actor_target", "critic", "critic_target", "actor_optim", "critic_optim"):
            getattr(self, name).load_state_dict(d[name])

    def meta(self) -> dict:
        return {"baseline": self.baseline, "updates": self.updates, "rng": self.rng.bit_generator.state}

    def load_meta(self, d: dict) -> None:
        self.baseline = d["baseline"]
        self.updates = int(d["updates"])
        self.rng.bit_generator.state = d["rng"]
