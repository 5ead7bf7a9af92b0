"""The worker tier: arq settings, the job that runs one source, and the tasks."""
