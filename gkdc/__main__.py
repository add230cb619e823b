import sys

from gkdc.cli import main

sys.exit(main())
