"""Pure-math core of PPO-based RLHF: KL estimators/controllers, GAE, PPO losses, reward normalisation."""
