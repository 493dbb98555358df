"""Imports every command module so that its ``@cli.command()`` runs. One line per module."""

from . import plan_cmd  # noqa: F401  (targets, plan)
from . import bundle_cmd  # noqa: F401  inspect, verify
from . import build_cmd  # noqa: F401  build
from . import run_cmd  # noqa: F401  run, chat, bench
from . import serve_cmd  # noqa: F401  serve
from . import gpu_cmd  # noqa: F401  doctor, engine, selftest
from . import flash_cmd  # noqa: F401  flash, releases
from . import eval_cmd  # noqa: F401  eval
