"""PPO for language models: the trainer, its state, and the run/resume protocol around it."""
