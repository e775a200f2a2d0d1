import sys

from lnm_auto.cli import main

sys.exit(main())
