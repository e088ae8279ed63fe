"""The first process inside every sandbox, and the NATS relay beside it.

Standard library only (Python 3.9 or later): the launchers copy or mount this
one file into sandboxes whose images carry nothing of symbi. Three modes:

``relay --listen A --connect B``
    Accept connections on ``A`` and join each to a new connection to ``B``.
    Addresses are ``tcp:HOST:PORT``, ``unix:PATH`` or ``vsock:CID:PORT``.
``run --listen A --connect B [--report-status] -- COMMAND...``
    The entry point of a container: relay in a thread, run ``COMMAND`` as a
    child, forward SIGTERM/SIGINT to it, reap orphans (it is PID 1) and exit
    with the child's status (also printed as ``symbi-exit-status: N`` with
    ``--report-status``, for sandboxes whose status nobody else keeps).
``pipe --connect B``
    Join standard input and output to one connection to ``B`` (QEMU's
    ``guestfwd=...-cmd:`` runs this for every guest connection).
``guest LAUNCH_JSON``
    PID 1 of a micro-VM (as root): read the command, user, environment and
    relay from ``LAUNCH_JSON``, run the command as that user, print
    ``symbi-exit-status: N`` on the console and reboot, which ends the VM.

Inside every sandbox the agent therefore finds NATS at
``nats://127.0.0.1:4222``; only the relay knows the way out (a Unix socket,
a vsock port or the one forwarded guest address), and it leads only to NATS.

Every mode prints ``symbi-init: started ...`` on stderr once the command runs,
or ``symbi-init: cannot run ...`` and exits 127: the launchers wait for one of
the two lines to know that a sandbox really started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

STARTED = "symbi-init: started"
CANNOT_RUN = "symbi-init: cannot run"
EXIT_STATUS = "symbi-exit-status:"
EXIT_CANNOT_RUN = 127
#: 2020-01-01: a guest clock before this was never set (no RTC).
CLOCK_SANITY_S = 1_577_836_800
CHUNK = 65536


def _log(message: str) -> None:
    sys.stderr.write(f"symbi-init: {message}\n")
    sys.stderr.flush()


# -- addresses ----------------------------------------------------------------


def parse_address(address: str) -> tuple[str, str, int]:
    """``(kind, host-or-path-or-cid, port)`` of ``tcp:H:P``, ``unix:PATH`` or ``vsock:C:P``."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return kind, rest, 0
    if kind in ("tcp", "vsock"):
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return kind, host, int(port)
    raise ValueError(
        f"bad address {address!r}: expected tcp:HOST:PORT, unix:PATH or vsock:CID:PORT"
    )


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, where, port = parse_address(address)
    if kind == "tcp":
        return await asyncio.open_connection(where, port)
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined,unused-ignore]
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (int(where), port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _listen(address: str, handler: Any) -> asyncio.AbstractServer:
    kind, where, port = parse_address(address)
    if kind == "tcp":
        return await asyncio.start_server(handler, where, port)
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        server = await asyncio.start_unix_server(handler, where)
        os.chmod(where, 0o660)
        return server
    raise ValueError("listening on vsock is not supported")


# -- relay --------------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close (the other direction may still talk)."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def serve_relay(listen: str, connect: str, ready: threading.Event | None = None) -> None:
    """Join every connection accepted on ``listen`` to a new one to ``connect``, forever."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await _open(connect)
        except OSError as exc:
            _log(f"relay: cannot reach {connect}: {exc.strerror or exc}")
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    server = await _listen(listen, handle)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


async def _relay_until_signalled(listen: str, connect: str) -> None:
    """The relay as a process of its own (often PID 1, which ignores unhandled SIGTERM)."""
    task = asyncio.ensure_future(serve_relay(listen, connect))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _relay_in_thread(listen: str, connect: str) -> None:
    ready = threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        # Signals must reach the main thread, which waits for the command:
        # a signal taken by this thread would not interrupt its waitpid().
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            asyncio.run(serve_relay(listen, connect, ready))
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    threading.Thread(target=main, name="symbi-relay", daemon=True).start()
    ready.wait(10)
    if errors:
        raise errors[0]


def _connect_blocking(address: str) -> socket.socket:
    kind, where, port = parse_address(address)
    if kind == "tcp":
        return socket.create_connection((where, port), timeout=10)
    family = socket.AF_UNIX if kind == "unix" else socket.AF_VSOCK  # type: ignore[attr-defined,unused-ignore]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(where if kind == "unix" else (int(where), port))
    return sock


def pipe(connect: str) -> int:
    """Copy stdin to a connection to ``connect`` and the connection to stdout."""
    try:
        sock = _connect_blocking(connect)
    except OSError as exc:
        _log(f"pipe: cannot reach {connect}: {exc.strerror or exc}")
        return 1
    sock.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    with sock, selector:
        try:
            while True:
                for key, _ in selector.select():
                    if key.fileobj == 0:
                        data = os.read(0, CHUNK)
                        if not data:  # the guest closed: pass it on, drain the answer
                            selector.unregister(0)
                            sock.shutdown(socket.SHUT_WR)
                            continue
                        sock.sendall(data)
                    else:
                        data = sock.recv(CHUNK)
                        if not data:
                            return 0
                        view = memoryview(data)
                        while view:
                            view = view[os.write(1, view) :]
        except OSError:
            return 0


# -- running the command ------------------------------------------------------


def _spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes] | None:
    try:
        child = subprocess.Popen(list(argv), **kwargs)
    except OSError as exc:
        _log(f"cannot run {argv[0]!r}: {exc.strerror or exc}")
        return None
    _log(f"started {argv[0]} (pid {child.pid})")
    return child


def _wait_reaping(child: subprocess.Popen[bytes]) -> int:
    """Forward SIGTERM/SIGINT to ``child``; reap every process until it exits; its status."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            code = child.returncode
            return 128 - code if code < 0 else code


def run(
    listen: str | None, connect: str | None, argv: Sequence[str], report_status: bool = False
) -> int:
    code = EXIT_CANNOT_RUN
    try:
        if listen and connect:
            try:
                _relay_in_thread(listen, connect)
            except (OSError, ValueError) as exc:
                _log(f"cannot run the NATS relay: {exc}")
                return code
        child = _spawn(argv)
        if child is not None:
            code = _wait_reaping(child)
        return code
    finally:
        if report_status:
            sys.stderr.write(f"{EXIT_STATUS} {code}\n")
            sys.stderr.flush()


# -- micro-VM PID 1 -----------------------------------------------------------

RB_AUTOBOOT = 0x01234567


def _reboot() -> None:
    """End the VM: QEMU runs with -no-reboot, Firecracker exits on reboot too."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_AUTOBOOT)
    with open("/proc/sysrq-trigger", "w") as trigger:  # if reboot(2) was refused
        trigger.write("b")


def guest(launch_path: str) -> int:
    code = EXIT_CANNOT_RUN
    try:
        with open(launch_path) as f:
            launch: dict[str, Any] = json.load(f)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in launch.get("env", {}).items()})
        with contextlib.suppress(OSError):
            socket.sethostname(str(launch.get("hostname", "sandbox")))
        if time.time() < CLOCK_SANITY_S:
            _log("warning: the clock is not set; every message the agent signs will be stale")
        relay = launch.get("relay")
        if relay:
            _relay_in_thread(str(relay["listen"]), str(relay["connect"]))
        uid, gid = int(launch["uid"]), int(launch["gid"])
        child = _spawn(
            [str(a) for a in launch["argv"]],
            cwd=str(launch.get("workdir", "/")),
            user=uid,
            group=gid,
            extra_groups=[],
            umask=0o077,
            stdin=subprocess.DEVNULL,
        )
        if child is not None:
            code = _wait_reaping(child)
    except Exception as exc:
        _log(f"cannot run the agent: {exc}")
    finally:
        sys.stdout.flush()
        sys.stderr.write(f"\n{EXIT_STATUS} {code}\n")
        sys.stderr.flush()
        if os.getpid() == 1:
            _reboot()
    return code


# -- command line -------------------------------------------------------------


def _option(args: list[str], name: str) -> str | None:
    if name in args:
        i = args.index(name)
        if i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _log("usage: sandbox_init.py relay|run|guest ...")
        return 2
    mode, rest = args[0], args[1:]
    command: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, command = rest[:i], rest[i + 1 :]
    listen, connect = _option(rest, "--listen"), _option(rest, "--connect")
    report_status = "--report-status" in rest
    if report_status:
        rest.remove("--report-status")
    if mode == "relay" and listen and connect and not rest:
        asyncio.run(_relay_until_signalled(listen, connect))
        return 0
    if mode == "pipe" and connect and not listen and not rest:
        return pipe(connect)
    if mode == "run" and command and not rest:
        return run(listen, connect, command, report_status)
    if mode == "guest" and len(rest) == 1:
        return guest(rest[0])
    _log(f"bad arguments: {' '.join(args)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
