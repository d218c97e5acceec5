import sys

from fusealign.cli import main

sys.exit(main())
