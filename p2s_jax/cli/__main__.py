"""`python -m p2s_jax.cli`."""

import sys

from p2s_jax.cli.main import main

sys.exit(main())
