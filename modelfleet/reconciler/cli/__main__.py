"""`python -m modelfleet.reconciler.cli`."""

import sys

from modelfleet.reconciler.cli.main import main

sys.exit(main())
