"""Monitoring: control-plane metrics, Triton's metrics read back, Prometheus targets and configs, the alert sink."""
