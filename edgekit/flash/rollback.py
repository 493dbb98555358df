"""Going back to the previous release on a device, and listing the releases there."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DeviceError
from . import releases as rel
from .lock import acquire as lock_device
from .parallel import in_threads
from .probe import run_probe
from .releases import Release
from .results import FlashProgress, Progress, RollbackResult
from .ssh import Device, Session, SessionGroup, as_device


def rollback(device: str | Device, *, progress: Progress | None = None) -> RollbackResult:
    """Make the release that was current before the current one current again (``history`` goes one back)."""
    return _rollback_one(as_device(device), progress, None)


def rollback_many(devices: Sequence[str | Device], *, jobs: int | None = None,
                  progress: Progress | None = None) -> list[tuple[Device, RollbackResult | None, DeviceError | None]]:
    """:func:`rollback` on several devices in parallel threads: (device, result, error) in order."""
    targets = [as_device(d) for d in devices]
    group = SessionGroup()

    def one(device: Device):
        try:
            return device, _rollback_one(device, progress, group), None
        except DeviceError as e:
            return device, None, e

    return in_threads(one, targets, jobs, group)


def _rollback_one(device: Device, progress: Progress | None, group: SessionGroup | None) -> RollbackResult:
    with Session(device, group) as s, lock_device(s, device.path):
        if progress:
            progress(FlashProgress(device.name, "probe", "reading the releases on the device"))
        info, state = run_probe(s)
        to, history = rel.rollback_target(state, device.name)
        if progress:
            progress(FlashProgress(device.name, "rollback", f"current -> releases/{to}"))
        rel.switch(s, info.path, to, history, [], before=state.current)
        return RollbackResult(device.name, info.path, state.current, to)


def list_releases(device: str | Device) -> list[Release]:
    """The releases on a device: current first, then by last use; incomplete ones are marked."""
    device = as_device(device)
    with Session(device) as s:
        _info, state = run_probe(s)
    return rel.releases_of(state)
