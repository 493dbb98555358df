"""Imports every command module so that its ``@cli.command()`` runs. One line per module."""

from . import plan_cmd  # noqa: F401  (targets, plan)
from . import bundle_cmd  # noqa: F401  inspect, verify
from . import gpu_cmd  # noqa: F401  doctor, engine, selftest
