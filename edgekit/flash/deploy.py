"""One flash: a bundle onto a device over SSH, atomic, resumable and verified on the device.

One flash is a series of ssh commands over one shared connection: lock the device folder (one flash or
rollback at a time, :mod:`edgekit.flash.lock`) -> probe the device -> refuse early if the
bundle's target, JetPack or GPU does not match or the disk is too small -> plan (reuse files the device
already has, resume half-sent ones) -> send the rest as ``NAME.part`` -> sha256 of every file computed on
the device -> finalize (rename, manifest.json last) -> [build the engine there] -> switch ``current`` with
one rename -> prune old releases -> [smoke test, rolling back if it fails]. The layout on the device is
described in :mod:`edgekit.flash.releases`; the device needs a POSIX shell, coreutils and ssh, plus python3
with edgekit only for ``smoke`` and ``build_engine``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeployFailed, DeviceError, DeviceMismatch, UserInputError
from ..runtime.bundle import MANIFEST, Manifest, read_manifest, verify
from ..units import fmt_bytes
from . import releases as rel
from .lock import DeviceLock
from .lock import acquire as lock_device
from .parallel import in_threads
from .probe import DeviceInfo, DeviceState, check_device, check_space, run_probe
from .results import DeviceOutcome, FlashProgress, FlashResult, Progress
from .ssh import Device, Session, SessionGroup, as_device
from .transfer import (
    SENT,
    FileAction,
    as_send,
    extras,
    finalize,
    hash_files,
    mismatches,
    plan_files,
    prepare,
    remove,
    send_file,
)

DEFAULT_KEEP = 3


@dataclass(frozen=True)
class _Bundle:
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def id(self) -> str:
        return self.manifest.id


def _load_bundle(bundle: str | Path) -> _Bundle:
    """The bundle's manifest, checked here first: sizes of all files, hashes of the small ones (seconds)."""
    manifest = read_manifest(bundle)
    verify(bundle, weights=False).raise_for_problems()
    return _Bundle(manifest, (manifest.folder / MANIFEST).read_bytes())


def flash(bundle: str | Path, device: str | Device, *, keep: int = DEFAULT_KEEP, smoke: bool = False,
          build_engine: bool = False, dry_run: bool = False, progress: Progress | None = None,
          smoke_timeout: float = 600, engine_timeout: float | None = 4 * 3600) -> FlashResult:
    """Deploy ``bundle`` to one device and make it current. See the module docstring for the steps.

    ``device`` is a :class:`Device` or ``"user@host"`` / an ssh_config name, optionally ``":PATH"``.
    ``keep`` releases stay on the device (never fewer than current and the one before). ``smoke`` loads the
    new current release on the device and generates a few tokens, rolling back if that fails;
    ``build_engine`` runs ``edgekit engine`` on the release before the switch. ``dry_run`` probes, checks
    and plans without changing anything. Raises BundleError for a bad bundle, DeviceError subclasses for
    the device.
    """
    _check_keep(keep)
    return _flash_one(_load_bundle(bundle), as_device(device), keep=keep, smoke=smoke, build_engine=build_engine,
                      dry_run=dry_run, progress=progress, smoke_timeout=smoke_timeout, engine_timeout=engine_timeout,
                      group=None)


def flash_many(bundle: str | Path, devices: Sequence[str | Device], *, jobs: int | None = None,
               **options) -> list[DeviceOutcome]:
    """Flash several devices in parallel threads (``options`` as for :func:`flash`); one failing does not stop
    the others. Outcomes come back in the order of ``devices``. A bad bundle raises before any device."""
    _check_keep(options.get("keep", DEFAULT_KEEP))
    b = _load_bundle(bundle)
    targets = [as_device(d) for d in devices]
    if not targets:
        raise UserInputError("no device given: name at least one (user@host or an ssh_config Host)")
    options.setdefault("keep", DEFAULT_KEEP)
    group = SessionGroup()

    def one(device: Device) -> DeviceOutcome:
        try:
            kw = {"smoke": False, "build_engine": False, "dry_run": False, "progress": None, "smoke_timeout": 600,
                  "engine_timeout": 4 * 3600, **options}
            return DeviceOutcome(device.name, _flash_one(b, device, group=group, **kw), None)
        except DeviceError as e:
            return DeviceOutcome(device.name, None, e)

    return in_threads(one, targets, jobs, group)


def _check_keep(keep) -> None:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise UserInputError(f"invalid keep {keep!r}: keep at least 1 release (current and the previous one are "
                             "always kept)")


@dataclass
class _Run:
    """One flash under way: what its steps share, and the FlashResult it makes."""

    name: str
    bundle: _Bundle
    info: DeviceInfo
    state: DeviceState
    planned: list[FileAction]       # the plan as made
    actions: list[FileAction]       # as done (files found corrupt on the device are re-sent)
    need: int                       # bytes the plan had to send
    started: float
    warnings: list[str] = field(default_factory=list)

    @property
    def bid(self) -> str:
        return self.bundle.id

    @property
    def path(self) -> str:
        return self.info.path

    def result(self, **kw) -> FlashResult:
        actions = self.actions
        return FlashResult(
            device=self.name, bundle_id=self.bid, path=self.path, info=self.info, files=len(actions),
            sent=tuple(a.name for a in actions if a.how in SENT),
            linked=tuple(a.name for a in actions if a.how == "link"),
            present=tuple(a.name for a in actions if a.how in ("present", "part")),
            bytes_resumed=sum(a.offset for a in actions if a.how == "resume"),
            bytes_planned=self.need, bytes_total=sum(a.size for a in self.planned), previous=self.state.current,
            warnings=tuple(self.warnings), seconds=round(time.monotonic() - self.started, 3), **kw)


def _flash_one(b: _Bundle, device: Device, *, keep: int, smoke: bool, build_engine: bool, dry_run: bool,
               progress: Progress | None, smoke_timeout: float, engine_timeout: float | None,
               group: SessionGroup | None) -> FlashResult:
    started = time.monotonic()
    name = device.name

    def report(stage: str, message: str = "", **kw) -> None:
        if progress:
            progress(FlashProgress(name, stage, message, **kw))

    report("connect", f"connecting to {name}")
    with Session(device, group) as s, contextlib.ExitStack() as held:
        lock = None
        if not dry_run:
            # Before the probe: what it reads stays true until the switch, no other flash interleaves.
            report("lock", f"locking {device.path} on the device")
            lock = held.enter_context(lock_device(s, device.path))
        run = _plan(s, b, lock, report, started, "--smoke" if smoke else "--build-engine" if build_engine else None)
        if dry_run:
            return run.result(bytes_sent=0, switched=False, pruned=(), smoke=None, engine_log=None, dry_run=True)
        run.actions, sent = _transfer(s, b, run.path, run.state, run.actions, report, run.warnings)
        engine_log = _build_engine(s, run, report, engine_timeout) if build_engine else None
        before, prune = _switch(s, run, report, keep)
        smoke_text = _smoke(s, run, report, before, prune, smoke_timeout) if smoke else None
        report("done", f"done: current -> releases/{run.bid}" + (" (smoke test passed)" if smoke else ""))
        return run.result(bytes_sent=sent, switched=True, pruned=tuple(prune), smoke=smoke_text,
                          engine_log=engine_log, dry_run=False)


def _plan(s: Session, b: _Bundle, lock: DeviceLock | None, report, started: float, needs: str | None) -> _Run:
    """Probe the device, refuse a bundle that does not belong there or does not fit, and plan the files."""
    name = s.device.name
    report("probe", "probing the device")
    info, state = run_probe(s, b.id)
    report("probe", info.summary())
    warnings = _refuse_or_warn(b, info, state, name, needs)
    if lock is not None and lock.stale:
        warnings.append(f"took over the lock of a flash that is gone ({lock.stale})")
    actions = plan_files(b.manifest.files, state, b.id)
    need = sum(a.to_send for a in actions)
    why = check_space(info, need, device=name)
    if why:
        raise DeviceMismatch(why, device=name)
    hows = [a.how for a in actions]
    report("plan", f"{hows.count('send') + hows.count('resume')} file(s) to send ({fmt_bytes(need)}), "
                   f"{hows.count('link')} reused on the device, "
                   f"{hows.count('present') + hows.count('part')} already there", total=need)
    return _Run(name, b, info, state, actions, actions, need, started, warnings)


def _refuse_or_warn(b: _Bundle, info: DeviceInfo, state: DeviceState, name: str, needs: str | None) -> list[str]:
    """The warnings for this device, or DeviceMismatch with the first reason the bundle must not go there."""
    problems, warnings = check_device(b.manifest, info, needs_edgekit=needs)
    if state.current_not_link:
        problems.append(f"{info.path}/current exists and is not a symlink (not made by edgekit): move it away or "
                        "choose another --path")
    if problems:
        raise DeviceMismatch(f"{name}: {problems[0]}", device=name)
    if state.current_foreign:
        warnings.append(f"{info.path}/current points to {state.current_foreign}, not to a release: it will be "
                        "replaced")
    return warnings


def _build_engine(s: Session, run: _Run, report, timeout: float | None) -> str:
    """``edgekit engine`` on the new release, before the switch; DeployFailed (with ``.log``) if it fails."""
    report("engine", "building the engine on the device (edgekit engine)")
    ok, engine_log = rel.build_engine(s, run.info.python_path, f"{run.path}/releases/{run.bid}", timeout=timeout)
    if not ok:
        lines = [ln.strip() for ln in engine_log.splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        err = DeployFailed(f"{run.name}: edgekit engine failed on the device ({last}): nothing was switched "
                           f"(current is still {_rel_text(run.state.current)})", device=run.name)
        err.log = engine_log    # the CLI prints it; callers of the API read it here
        raise err
    return engine_log


def _switch(s: Session, run: _Run, report, keep: int) -> tuple[list[str], list[str]]:
    """Make the new release current and prune old ones: (the history before, the releases pruned)."""
    state, bid = run.state, run.bid
    before = rel.base_history(state)
    history = rel.history_with(state, bid)
    prune = rel.prune_list(state, history, keep, flashed=bid)
    history = [h for h in history if h not in prune]
    report("switch", f"switching current -> releases/{bid}"
           + (f", pruning {len(prune)} old release(s)" if prune else ""))
    run.warnings += rel.switch(s, run.path, bid, history, prune, before=state.current)
    return before, prune


def _smoke(s: Session, run: _Run, report, before: list[str], prune: list[str], timeout: float) -> str:
    """The smoke test's report; on failure, roll back and raise DeployFailed."""
    path, bid = run.path, run.bid
    report("smoke", f"smoke test: load {path}/current and generate {rel.SMOKE_TOKENS} tokens")
    ok, smoke_text = rel.smoke(s, run.info.python_path, path, timeout=timeout)
    if not ok:
        # Back to the release that was in use before (or, re-flashing the current one, the one before it).
        back_history = [h for h in before if h != bid and h not in prune]
        back = back_history[-1] if back_history else None
        report("rollback", f"smoke test failed: current -> {_rel_text(back)}")
        rel.switch(s, path, back, back_history, [], before=bid)
        where = (f"rolled back, current -> releases/{back}" if back else
                 "no earlier release to roll back to, current removed")
        raise DeployFailed(f"{run.name}: smoke test failed on the device ({smoke_text}): {where}", device=run.name)
    return smoke_text


def _transfer(s: Session, b: _Bundle, path: str, state: DeviceState, actions: list[FileAction], report,
              warnings: list[str]) -> tuple[list[FileAction], int]:
    """Link, send, verify on the device and finalize the release folder. (the actions as done, bytes sent)."""
    bid, name = b.id, s.device.name
    report("prepare", f"preparing {path}/releases/{bid}")
    prepare(s, path, bid, actions)
    counter = _Counter(report, sum(a.to_send for a in actions))
    for a in actions:
        if a.how in SENT:
            counter.send(s, path, bid, a, b.manifest.folder)
    report("verify", f"verifying {len(actions)} files on the device (sha256sum)")
    hashes, entries = hash_files(s, path, bid, actions)
    bad = mismatches(actions, hashes)
    _fail_on_sent(name, [a for a in bad if a.how in SENT], hashes, s, path, bid, state)
    if bad:
        # Copies the device already had (an older release, an earlier run) went bad on its disk: send them.
        redo = [as_send(a) for a in bad]
        remove(s, path, bid, [a.staged for a in bad])
        counter.total += sum(a.size for a in redo)
        for a in redo:
            counter.send(s, path, bid, a, b.manifest.folder)
        report("verify", f"verifying {len(redo)} re-sent file(s) on the device")
        hashes, entries = hash_files(s, path, bid, redo)
        _fail_on_sent(name, mismatches(redo, hashes), hashes, s, path, bid, state)
        replaced = {a.name: a for a in redo}
        actions = [replaced.get(a.name, a) for a in actions]
        warnings.append(f"re-sent {len(redo)} file(s) whose copy on the device was corrupt: "
                        + ", ".join(a.name for a in redo))
    complete = bid in state.releases and state.releases[bid].complete
    report("finalize", "finalizing the release (manifest.json last)")
    finalize(s, path, bid, actions, [] if complete else extras(entries, actions),
             None if complete else b.manifest_bytes)
    return actions, counter.sent


class _Counter:
    """Bytes sent so far in one flash, reported as ``send`` progress events."""

    def __init__(self, report, total: int):
        self.report, self.total, self.sent = report, total, 0

    def send(self, session: Session, path: str, bid: str, action: FileAction, folder: Path) -> None:
        def on_bytes(n: int) -> None:
            self.sent += n
            self.report("send", "", file=action.name, done=self.sent, total=self.total)

        self.report("send", "start", file=action.name, done=self.sent, total=self.total)
        send_file(session, path, bid, action, folder / action.name, on_bytes)


def _rel_text(release: str | None) -> str:
    return f"releases/{release}" if release else "unset"


def _fail_on_sent(name: str, bad: list[FileAction], hashes: dict[str, str], session: Session, path: str, bid: str,
                  state: DeviceState) -> None:
    """DeployFailed naming the first file sent in this run that the device's sha256 does not confirm, after
    deleting the bad copies (the next run sends them again)."""
    if not bad:
        return
    remove(session, path, bid, [a.staged for a in bad])
    a = bad[0]
    got = hashes.get(a.name, "missing")
    what = ("is missing" if got == "missing" else "cannot be read" if got == "unreadable" else
            f"has sha256 {got[:12]}... but the manifest says {a.sha256[:12]}...")
    more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
    raise DeployFailed(f"{name}: verification failed: {a.name} {what} on the device after transfer{more}: "
                       f"nothing was switched (current is still {_rel_text(state.current)}); the bad copy was "
                       "deleted, run the same command again to re-send it", device=name)
