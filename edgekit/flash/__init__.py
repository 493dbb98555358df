"""Deploying bundles to devices over SSH: atomic, resumable, verified on the device, with rollback.

::

    from edgekit.flash import Device, flash, rollback, list_releases
    result = flash("bundles/r1-1.5b-orin", Device("robot@jetson.local", path="/opt/edgekit"), smoke=True)

The steps of one flash are in :mod:`edgekit.flash.deploy`, going back in :mod:`edgekit.flash.rollback`.
Nothing here prints: progress goes to the ``progress`` callback as :class:`FlashProgress` events, results
are returned, and a failing device raises a one-line DeviceUnreachable, DeviceMismatch or DeployFailed
(``edgekit.errors``). :func:`flash_many` runs devices in parallel threads and collects each outcome.
"""

from .deploy import DEFAULT_KEEP, flash, flash_many
from .probe import DeviceInfo
from .releases import Release
from .results import DeviceOutcome, FlashProgress, FlashResult, RollbackResult
from .rollback import list_releases, rollback, rollback_many
from .ssh import DEFAULT_PATH, DEFAULT_PYTHON, Device, parse_device

__all__ = ["Device", "DeviceInfo", "FlashProgress", "FlashResult", "DeviceOutcome", "RollbackResult", "Release",
           "flash", "flash_many", "rollback", "rollback_many", "list_releases", "parse_device", "DEFAULT_PATH",
           "DEFAULT_PYTHON", "DEFAULT_KEEP"]
