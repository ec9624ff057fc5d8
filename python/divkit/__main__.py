import sys

from divkit.cli import main

sys.exit(main())
