"""Data: the built-in support task, the gold judge, loading and validation helpers."""
