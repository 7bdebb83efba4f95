"""Infrastructure: tracking, integrity, security, distributed helpers, progress, environment."""
