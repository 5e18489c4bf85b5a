"""What a run reports: the funnel summary, contact sheets and the Prefect artifacts."""
