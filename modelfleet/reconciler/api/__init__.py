"""The daemon's HTTP API: status, metrics, dashboard, webhook, uploads."""
