import sys

from ractd.cli import main

sys.exit(main())
