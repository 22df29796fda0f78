"""`python -m fiftyone_dinov2clip`."""
import sys

from .cli import main

sys.exit(main())
