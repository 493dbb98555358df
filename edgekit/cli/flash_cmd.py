"""``edgekit flash`` and ``edgekit releases``: deploy bundles to devices over SSH, roll back, list releases.

Exit status of ``edgekit flash`` (and ``--rollback``, ``releases``):
0 every device succeeded; 1 at least one device failed (unreachable, host key, refused key, wrong target,
not enough disk, verification, smoke test, engine build) -- the others still ran and the table shows each;
2 bad input before any device was contacted (no such bundle, a damaged bundle, bad options); 130, 143, 129
stopped by Ctrl-C, SIGTERM or SIGHUP (connections closed, device locks released). A device folder that
another flash or rollback holds (DIR/.lock) is a failure of that device, naming the holder.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
import time
from pathlib import Path

import click

from ..errors import UserInputError
from ..units import fmt_bytes
from ._common import cli, echo_json

# Text from a device or a manifest is untrusted: escape control characters so it cannot drive the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(value) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _ssh_options(f):
    for option in reversed((
        click.option("--path", default=None, metavar="DIR",
                     help="Folder on the device [default: ~/edgekit]; DEVICE:DIR sets it per device."),
        click.option("--port", type=click.IntRange(1, 65535), default=None, help="SSH port (else ssh_config's)."),
        click.option("-i", "--identity", type=click.Path(dir_okay=False, path_type=str), default=None,
                     help="Private key to log in with (in addition to ssh_config's and the agent's)."),
        click.option("-F", "--ssh-config", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
                     help="ssh_config file to use instead of ~/.ssh/config."),
        click.option("--remote-python", default=None, metavar="PY",
                     help="Python with edgekit on the device, for --smoke/--build-engine [default: python3]."),
    )):
        f = option(f)
    return f


def _device_defaults(path, port, identity, ssh_config, remote_python) -> dict:
    from ..flash import DEFAULT_PATH, DEFAULT_PYTHON

    return {"path": path or DEFAULT_PATH, "port": port, "identity": identity, "ssh_config": ssh_config,
            "python": remote_python or DEFAULT_PYTHON}


def _devices(names, hosts_file: Path | None, defaults: dict) -> list:
    from ..flash import parse_device

    texts = list(names)
    if hosts_file is not None:
        try:
            lines = hosts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"cannot read hosts file {hosts_file} ({e}): give a text file with one device "
                                 "per line") from None
        texts += [ln.split("#", 1)[0].strip() for ln in lines]
    seen, devices = set(), []
    for text in texts:
        if text and text not in seen:
            seen.add(text)
            devices.append(parse_device(text, **defaults))
    if not devices:
        raise click.UsageError("no device given: name at least one DEVICE (user@host or an ssh_config Host), "
                               "or --hosts-file")
    return devices


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (timeout, systemd, CI cancel, a closed terminal), raised where the command waits."""


@contextlib.contextmanager
def _signals_stop():
    """SIGTERM/SIGHUP end a flash as Ctrl-C does -- the library cuts its ssh connections, the devices' locks
    are released, no ssh process or socket folder is left -- then exit with 128 + the signal's number."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)

    wanted = (signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    except _Stopped as e:
        click.echo(f"error: flash stopped by {e}: the ssh connections were closed; `edgekit releases DEVICE` shows "
                   "what is current on each device, run the command again to finish", err=True)
        sys.exit(128 + signal.Signals[str(e)].value)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class _Printer:
    """Progress lines on stderr, one per step and at most one per second per device while sending."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}

    def line(self, text: str) -> None:
        with self.lock:
            click.echo(text, err=True)

    def __call__(self, event) -> None:
        if self.quiet or event.stage == "connect":
            return
        device = _clean(event.device)
        if event.stage != "send":
            self.line(f"{device}: {_clean(event.message)}")
            return
        now = time.monotonic()
        if event.message == "start":
            self.line(f"{device}: sending {_clean(event.file)}")
        elif event.done >= event.total or now - self.last.get(event.device, 0) >= 1.0:
            pct = f" ({100 * event.done // event.total}%)" if event.total else ""
            self.line(f"{device}: {fmt_bytes(event.done)} of {fmt_bytes(event.total)} sent{pct}")
        else:
            return
        self.last[event.device] = now


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _sent_text(r) -> str:
    if r.dry_run:
        return f"would send {len(r.sent)} file(s), {fmt_bytes(r.bytes_planned)}"
    text = f"{len(r.sent)} file(s), {fmt_bytes(r.bytes_sent)}"
    if r.bytes_resumed:
        text += f" (resumed, {fmt_bytes(r.bytes_resumed)} were there)"
    return text


def _reason(o) -> str:
    """The "what" part of a failure's one-line message (``device: what: fix``), shortened for the table."""
    text = str(o.error)
    if text.startswith(o.device + ": "):
        text = text[len(o.device) + 2:]
    text = text.split(": ", 1)[0]
    return _clean(text if len(text) <= 70 else text[:67] + "...")


def _detail(r) -> str:
    if r.dry_run:
        return (f"dry run: {len(r.linked)} file(s) reused on the device, {len(r.present)} already there; "
                f"{_clean(r.info.summary())}")
    parts = [f"current (was {r.previous or 'none'})"]
    if r.linked or r.present:
        parts.append(f"{len(r.linked) + len(r.present)} file(s) reused")
    if r.pruned:
        parts.append(f"pruned {', '.join(r.pruned)}")
    if r.smoke:
        parts.append(f"smoke ok: {_clean(r.smoke)}")
    if r.engine_log is not None:
        parts.append("engine built")
    return "; ".join(parts)


def _outcome_json(o) -> dict:
    if o.error is not None:
        return {"device": o.device, "ok": False, "error": str(o.error), "kind": type(o.error).__name__}
    r = o.result
    return {"device": o.device, "ok": True, "bundle_id": r.bundle_id, "path": r.path, "release": r.release,
            "dry_run": r.dry_run, "switched": r.switched, "previous": r.previous, "sent": list(r.sent),
            "linked": list(r.linked), "present": list(r.present), "bytes_sent": r.bytes_sent,
            "bytes_resumed": r.bytes_resumed, "bytes_planned": r.bytes_planned, "bytes_total": r.bytes_total,
            "pruned": list(r.pruned),
            "smoke": r.smoke, "engine_log": r.engine_log, "warnings": list(r.warnings), "seconds": r.seconds,
            "device_info": {k: v for k, v in r.info.__dict__.items()}}


@cli.command("flash")
@click.argument("args", nargs=-1, metavar="BUNDLE DEVICE...")
@click.option("--hosts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with one DEVICE per line (# starts a comment), added to those given.")
@_ssh_options
@click.option("--keep", type=click.IntRange(1, None), default=3, show_default=True,
              help="Releases kept on the device (current and the previous one are always kept).")
@click.option("--build-engine", is_flag=True, help="Run `edgekit engine` on the device before the switch.")
@click.option("--smoke", is_flag=True,
              help="After the switch, generate a few tokens on the device; roll back if that fails.")
@click.option("--dry-run", is_flag=True, help="Probe, check and plan only; change nothing.")
@click.option("--rollback", is_flag=True, help="Go back to the previous release on each DEVICE (no BUNDLE).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, help="Devices at a time [default: up to 8].")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines, only the result table.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def flash_cmd(args, hosts_file, path, port, identity, ssh_config, remote_python, keep, build_engine, smoke,
              dry_run, rollback, jobs, quiet, as_json) -> None:
    """Deploy BUNDLE to one or more devices over SSH: probe, send what is missing, verify on the device,
    switch DIR/current atomically, keep the last --keep releases.

    DEVICE is user@host or a Host name from ~/.ssh/config, optionally DEVICE:DIR. Exit status: 0 all
    devices ok, 1 some device failed, 2 bad input (bundle, options).
    """
    from ..flash import flash_many

    defaults = _device_defaults(path, port, identity, ssh_config, remote_python)
    printer = _Printer(quiet or as_json)
    if rollback:
        if build_engine or smoke or dry_run:
            raise click.UsageError("--rollback takes only devices: it cannot be combined with --smoke, "
                                   "--build-engine or --dry-run")
        _rollback(_devices(args, hosts_file, defaults), printer, jobs, as_json)
        return
    if not args:
        raise click.UsageError("give the BUNDLE folder and at least one DEVICE (or --rollback DEVICE)")
    bundle, names = args[0], args[1:]
    devices = _devices(names, hosts_file, defaults)
    with _signals_stop():
        outcomes = flash_many(bundle, devices, jobs=jobs, keep=keep, smoke=smoke, build_engine=build_engine,
                              dry_run=dry_run, progress=printer)
    if as_json:
        echo_json([_outcome_json(o) for o in outcomes])
    else:
        rows = [["DEVICE", "RESULT", "RELEASE", "SENT", "DETAIL"]]
        for o in outcomes:
            if o.ok:
                r = o.result
                rows.append([_clean(o.device), "dry-run" if r.dry_run else "ok", r.bundle_id, _sent_text(r),
                             _detail(r)])
            else:
                rows.append([_clean(o.device), "FAILED", "-", "-", _reason(o)])
        for line in _table(rows):
            click.echo(line)
    for o in outcomes:
        if o.ok:
            for w in o.result.warnings:
                click.echo(f"warning: {_clean(o.device)}: {_clean(w)}", err=True)
            if o.result.engine_log and not as_json:
                _print_log(o.device, o.result.engine_log)
        else:
            log = getattr(o.error, "log", None)
            if log and not as_json:
                _print_log(o.device, log)
            click.echo(f"error: {_clean(o.error)}", err=True)
    if not all(o.ok for o in outcomes):
        sys.exit(1)


def _print_log(device: str, log: str) -> None:
    click.echo(f"--- {_clean(device)}: edgekit engine log ---", err=True)
    for line in log.splitlines():
        click.echo(f"  {_clean(line)}", err=True)


def _rollback(devices, printer, jobs, as_json) -> None:
    from ..flash import rollback_many

    with _signals_stop():
        outcomes = rollback_many(devices, jobs=jobs, progress=printer)
    if as_json:
        echo_json([{"device": d.name, "ok": e is None, "error": str(e) if e else None,
                    "from": r.from_release if r else None, "to": r.to_release if r else None}
                   for d, r, e in outcomes])
    for d, r, e in outcomes:
        if e is not None:
            click.echo(f"error: {_clean(e)}", err=True)
        elif not as_json:
            click.echo(f"{_clean(d.name)}: rolled back: {r.path}/current -> releases/{r.to_release} "
                       f"(was releases/{r.from_release})")
    if any(e is not None for _, _, e in outcomes):
        sys.exit(1)


@cli.command("releases")
@click.argument("device")
@_ssh_options
@click.option("--json", "as_json", is_flag=True, help="Print the releases as JSON.")
def releases_cmd(device, path, port, identity, ssh_config, remote_python, as_json) -> None:
    """List the releases on DEVICE: which is current, which --rollback would go to, what each holds."""
    from ..flash import list_releases, parse_device

    d = parse_device(device, **_device_defaults(path, port, identity, ssh_config, remote_python))
    found = list_releases(d)
    if as_json:
        echo_json([dict(r.__dict__, state=r.state) for r in found])
        return
    if not found:
        click.echo(f"{_clean(d.name)}:{_clean(d.path)}: no releases")
        return
    rows = [["STATE", "RELEASE", "MODEL", "TARGET", "BACKEND", "PRECISION", "SIZE", "CREATED"]]
    for r in found:
        rows.append([r.state, r.id, _clean(r.model or "-"), _clean(r.target or "-"), _clean(r.backend or "-"),
                     _clean(r.precision or "-"), fmt_bytes(r.size) if r.complete else "-", _clean(r.created or "-")])
    click.echo(f"{_clean(d.name)}:{_clean(d.path)}")
    for line in _table(rows):
        click.echo("  " + line)
