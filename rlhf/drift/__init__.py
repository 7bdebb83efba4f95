"""Post-deployment drift monitoring: statistics, features, baseline profiles, signals, diagnosis, traffic simulator.

stats.py is pure numpy/scipy; the other modules need torch models (features,
profile, traffic) or MLflow (lineage). tasks/baseline.py, tasks/monitor.py and
flows/monitor.py wire them to the registry and Prefect.
"""
