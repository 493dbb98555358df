"""Imports every command module so that its ``@cli.command()`` runs. One line per module."""

from . import (
    build_cmd,  # build
    bundle_cmd,  # inspect, verify
    eval_cmd,  # eval
    flash_cmd,  # flash, releases
    gpu_cmd,  # doctor, engine, selftest
    plan_cmd,  # targets, plan
    run_cmd,  # run, chat, bench
    serve_cmd,  # serve
)

__all__ = ["build_cmd", "bundle_cmd", "eval_cmd", "flash_cmd", "gpu_cmd", "plan_cmd", "run_cmd", "serve_cmd"]
