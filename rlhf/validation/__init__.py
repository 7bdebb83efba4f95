"""Data validation: pandas row checks (checks.py) and the GX 1.x suites (suite.py)."""
