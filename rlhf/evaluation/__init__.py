"""Judging a trained policy: reward-hacking flags, policy violations, statistics."""
