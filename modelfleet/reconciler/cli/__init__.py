"""The `modelfleet` command line."""
