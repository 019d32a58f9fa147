"""The DDPG agent: shapes and defaults, noise, replay, learning, bit-exact save/restore."""

import numpy as np
import pytest
import torch

from amc_mobile.search.agent import DDPGAgent, ReplayBuffer, TruncatedNormalNoise
from amc_mobile.search.config import DDPGConfig


def _agent(seed=0, **kw):
    torch.manual_seed(seed)
    return DDPGAgent(12, 5, DDPGConfig(**kw), seed=seed)


def test_defaults_are_amcs():
    a = _agent()
    assert a.actor.fc1.out_features == a.actor.fc2.out_features == 300
    assert a.critic.fc_s.out_features == a.critic.fc_a.out_features == a.critic.fc2.out_features == 300
    assert a.actor_optim.param_groups[0]["lr"] == 1e-4 and a.critic_optim.param_groups[0]["lr"] == 1e-3
    assert a.cfg.tau == 0.01 and a.cfg.discount == 1.0 and a.cfg.batch_size == 64
    assert a.buffer.capacity == 100 * 5
    assert a.sigma(100, 100) == 0.5 and a.sigma(110, 100) == pytest.approx(0.5 * 0.95**10)
    out = a.actor(torch.zeros(3, 12))
    assert out.shape == (3, 1) and ((out > 0) & (out < 1)).all()


def test_truncated_normal_noise():
    rng = np.random.default_rng(0)
    noise = TruncatedNormalNoise(0.0, 1.0)
    xs = np.array([noise(rng, 0.95, 0.5) for _ in range(4000)])
    assert xs.min() >= 0 and xs.max() <= 1
    assert 0.55 < xs.mean() < 0.8  # pulled inside by the upper bound
    xs = np.array([noise(rng, 0.3, 0.01) for _ in range(1000)])
    assert abs(xs.mean() - 0.3) < 0.002 and xs.std() == pytest.approx(0.01, rel=0.15)
    assert noise(rng, 1.7, 0.0) == 1.0


def test_replay_ring_buffer():
    buf = ReplayBuffer(4, 2)
    for i in range(6):
        buf.add(np.full(2, i), i / 10, -i, np.full(2, i + 1), i % 2 == 0)
    assert len(buf) == 4 and buf.ptr == 2
    assert sorted(buf.s[:, 0].tolist()) == [2, 3, 4, 5]
    s, a, r, s2, d = buf.sample(np.random.default_rng(0), 16)
    assert s.shape == (16, 2) and a.shape == r.shape == d.shape == (16, 1)
    assert torch.equal(s2[:, 0], s[:, 0] + 1) and torch.allclose(r[:, 0], -s[:, 0])


def _fill(agent, n=80, seed=1):
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = rng.random(12).astype(np.float32)
        a = float(rng.random())
        agent.observe(s, a, -abs(a - 0.3), rng.random(12).astype(np.float32), i % 5 == 4)


def test_updates_learn_towards_the_better_action():
    agent = _agent(seed=3)
    _fill(agent, 400)
    before = float(agent.critic(torch.zeros(1, 12), torch.tensor([[0.9]])))
    for _ in range(300):
        agent.update()
    assert agent.updates == 300 and agent.baseline is not None
    # rewards peak at a=0.3: the critic must now prefer 0.3 over 0.9 in a typical state
    s = torch.full((1, 12), 0.5)
    assert float(agent.critic(s, torch.tensor([[0.3]]))) > float(agent.critic(s, torch.tensor([[0.9]])))
    assert float(agent.critic(torch.zeros(1, 12), torch.tensor([[0.9]]))) != before
    # target networks moved, but only partly (soft update)
    w, wt = agent.actor.fc1.weight, agent.actor_target.fc1.weight
    assert not torch.equal(w, wt)


def test_state_roundtrip_continues_bit_for_bit():
    a = _agent(seed=5)
    _fill(a)
    for _ in range(5):
        a.update()
    b = _agent(seed=99)  # different init and generator: everything must come from the saved state
    b.load_tensors(a.tensors())
    b.buffer.load_state_dict(a.buffer.state_dict())
    b.load_meta(a.meta())
    s = np.linspace(0, 1, 12).astype(np.float32)
    for _ in range(3):
        assert a.update() == b.update()
        assert a.select_action(s, 0.3) == b.select_action(s, 0.3)
        assert a.random_action() == b.random_action()
    for (k, v), (_, w) in zip(a.actor.state_dict().items(), b.actor.state_dict().items()):
        assert torch.equal(v, w), k


def test_same_seed_same_agent():
    a, b = _agent(seed=7), _agent(seed=7)
    s = np.zeros(12, np.float32)
    assert [a.select_action(s, 0.5) for _ in range(5)] == [b.select_action(s, 0.5) for _ in range(5)]
    assert a.random_action() != _agent(seed=8).random_action()
