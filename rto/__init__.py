"""RTO: Reinforced Token Optimization (PPO with a dense DPO token reward) and the pipeline around it."""

__version__ = "0.1.0"
