"""`python -m llmft`: the command line (also under torchrun)."""

import sys

from llmft.cli import main

sys.exit(main())
