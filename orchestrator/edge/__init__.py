"""Layer 6 (above the worker): how the outside reaches the cluster: the HTTP API and its client,
the dashboard, the cluster's Prometheus metrics, ``vmorch doctor``."""
