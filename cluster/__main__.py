"""``python -m cluster train CONFIG`` (what ``ray job submit`` runs on a cluster)."""

import sys

from cluster.cli import main

sys.exit(main())
