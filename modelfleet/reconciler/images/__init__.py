"""Building the runtime images on the hosts: what goes into them (content), the build, its progress display."""
