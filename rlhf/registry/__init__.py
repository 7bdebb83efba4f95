"""The MLflow Model Registry side: promotion gates, aliases, rollback."""
