"""Running one device's flash or rollback per thread, and stopping all of them cleanly on Ctrl-C."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .ssh import Device, SessionGroup


def in_threads(one, targets: list[Device], jobs: int | None, group: SessionGroup) -> list:
    """``one(device)`` for each device in parallel threads. An exception in the waiting thread (Ctrl-C, or
    SIGTERM/SIGHUP turned into one by the CLI) first cuts every ssh connection of the group -- the threads
    then stop at their next step, their devices' locks are released and no ssh process or socket folder is
    left behind -- and is raised once they have."""
    with ThreadPoolExecutor(max_workers=jobs or min(8, len(targets))) as pool:
        futures = [pool.submit(one, d) for d in targets]
        try:
            return [f.result() for f in futures]
        except BaseException as e:
            group.abort(str(e) or type(e).__name__)
            for f in futures:
                f.cancel()
            raise
