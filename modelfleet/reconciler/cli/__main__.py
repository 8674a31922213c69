"""`python -m modelfleet.reconciler.cli.main`."""

import sys

from modelfleet.reconciler.cli.main.main import main

sys.exit(main())
