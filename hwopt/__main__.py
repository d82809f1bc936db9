import sys

from hwopt.cli import main

sys.exit(main())
