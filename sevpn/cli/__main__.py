"""C{python -m sevpn.cli}: the C{sevpn} command."""

import sys

from sevpn.cli import main

sys.exit(main())
