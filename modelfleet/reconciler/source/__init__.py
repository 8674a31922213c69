"""The Git source: fetching the tracked branch and reading manifest trees at a commit."""
