"""What a flash or rollback reports: progress events while it runs, results and outcomes when it is done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeviceError
from .probe import DeviceInfo


@dataclass(frozen=True)
class FlashProgress:
    """One progress event. ``stage`` is one of connect, lock, probe, plan, prepare, send, verify, finalize, engine,
    switch, smoke, rollback, done. During ``send``, ``done``/``total`` count the bytes of this flash and
    ``message`` is "start" when ``file`` begins (then one event per chunk sent)."""

    device: str
    stage: str
    message: str = ""
    file: str | None = None
    done: int = 0
    total: int = 0


Progress = Callable[[FlashProgress], None]


@dataclass(frozen=True)
class FlashResult:
    """What one flash did. Byte counts are file contents (manifest.json, a few KiB, is not counted)."""

    device: str
    bundle_id: str
    path: str                       # absolute DIR on the device
    info: DeviceInfo
    files: int                      # files in the bundle
    sent: tuple[str, ...]           # sent from here (in full or resumed)
    linked: tuple[str, ...]         # hard-linked or copied on the device from another release
    present: tuple[str, ...]        # already in the release folder (verified again)
    bytes_sent: int
    bytes_resumed: int              # not sent again because a NAME.part continued
    bytes_planned: int              # what the plan had to send (a dry run's answer)
    bytes_total: int                # size of all the bundle's files
    previous: str | None            # release that was current before
    switched: bool                  # False for dry runs
    pruned: tuple[str, ...]
    smoke: str | None               # the smoke test's one-line report
    engine_log: str | None
    warnings: tuple[str, ...]
    dry_run: bool
    seconds: float

    @property
    def release(self) -> str:
        return f"{self.path}/releases/{self.bundle_id}"


@dataclass(frozen=True)
class DeviceOutcome:
    """One device of :func:`edgekit.flash.flash_many`: its result, or the DeviceError that stopped it."""

    device: str
    result: FlashResult | None
    error: DeviceError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RollbackResult:
    device: str
    path: str
    from_release: str
    to_release: str
