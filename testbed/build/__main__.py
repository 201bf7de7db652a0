import sys

from testbed.build.cli import main

sys.exit(main())
