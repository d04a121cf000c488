"""`python -m spaceft` (and `accelerate launch -m spaceft run RECIPE`)."""

import sys

from spaceft.cli import main

if __name__ == "__main__":
    sys.exit(main())
