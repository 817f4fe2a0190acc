"""``python -m diffcodec`` (and ``torchrun ... -m diffcodec``): the `diffcodec` command."""

import os
import sys

from diffcodec import distributed
from diffcodec.cli import main

code = main()
if distributed.launched():
    # Under torchrun the command has left the process group (`distributed.finish`) and
    # closed its files; the interpreter's own teardown is skipped, because gloo's C++ worker
    # threads can still be alive then and abort the process ("terminate called without an
    # active exception", SIGABRT) after the work succeeded: a known c10d exit race.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
