"""What generate.py and bench.py share: which errors are the user's, and one line for each."""

from __future__ import annotations

import sys

import torch

from . import tp
from .errors import MinitreeError

USER_ERRORS = (MinitreeError, OSError)


def run(main, args) -> None:
    """sys.exit(main(**vars(args))), with a user error as one `error:` line and exit status 1."""
    try:
        sys.exit(main(**vars(args)))
    except USER_ERRORS as e:
        if tp.world()[0] == 0:  # under torchrun every rank meets the same bad input; one says so
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.distributed.DistError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: rank {tp.world()[0]} lost contact with the other ranks ({first})", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
