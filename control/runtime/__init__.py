"""Processes recserve runs: tritonserver, the degraded-answer server, Prometheus/Alertmanager, host checks."""
