"""Build the demo model zoo and print the sources x tasks table.

Usage: python scripts/build_demo_zoo.py [OUT_DIR=zoo] [--force]
Same as `mergesearch zoo`. Deterministic; cached in OUT_DIR/zoo.json, keyed by a hash of its inputs.
"""

import sys

from mergesearch.zoo.build import main

if __name__ == "__main__":
    sys.exit(main())
