"""rlhf: the library behind the pipeline (config, data, RL math, tracking, CLI)."""
