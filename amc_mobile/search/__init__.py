"""The AMC search with a latency (or FLOPs/params) budget: cost models, reconstruction, the
environment with its action wall, the DDPG agent, and the loop (`run_search`)."""

from .agent import Actor, Critic, DDPGAgent, ReplayBuffer, TruncatedNormalNoise
from .config import DDPGConfig, SearchConfig
from .cost import CostModel, FlopsCost, LatencyCost, ParamsCost, layer_costs
from .env import ActionWall, Episode, PruningEnv, Score, grid_counts, round_channels
from .export import SearchResult
from .loop import run_search
from .run_folder import read_log, resume_config
from .setup import prepare
from .reconstruct import ChannelSelector, PrunedModelBuilder, Reconstructor, collect_layer_stats

__all__ = [
    "ActionWall", "Actor", "ChannelSelector", "CostModel", "Critic", "DDPGAgent", "DDPGConfig", "Episode",
    "FlopsCost", "LatencyCost", "ParamsCost", "PrunedModelBuilder", "PruningEnv", "Reconstructor", "ReplayBuffer",
    "Score", "SearchConfig", "SearchResult", "TruncatedNormalNoise", "collect_layer_stats", "grid_counts",
    "layer_costs", "prepare", "read_log", "resume_config", "round_channels", "run_search",
]
