"""The Docker pool: one adapter per host (docker-py) and observing managed containers."""
