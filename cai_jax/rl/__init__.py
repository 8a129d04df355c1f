"""Reinforcement-learning pieces as pure array functions (PPO with a KL penalty)."""
