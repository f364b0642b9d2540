"""`python -m dsv3` is `dsv3-run`."""
import sys

from dsv3.commands.main import main

sys.exit(main())
