import sys

from llrd_search.cli import main

sys.exit(main())
