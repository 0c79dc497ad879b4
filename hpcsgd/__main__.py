import sys

from hpcsgd.cli import main

sys.exit(main())
