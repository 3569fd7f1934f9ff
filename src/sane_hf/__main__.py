"""`python -m sane_hf` is the `sane-hf` command (and works under `torchrun -m` / `accelerate launch -m`)."""

import sys

from sane_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
