import sys

from amc_mobile.cli import main

sys.exit(main())
