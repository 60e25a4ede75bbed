import sys

from sim.node.cli import main

sys.exit(main())
