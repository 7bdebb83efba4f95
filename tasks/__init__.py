"""One module per pipeline stage: a plain function that does the work plus a thin @task."""
