"""``python -m diffcodec`` (and ``torchrun ... -m diffcodec``): the `diffcodec` command."""

import sys

from diffcodec.cli import main

sys.exit(main())
