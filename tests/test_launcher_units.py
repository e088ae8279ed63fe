"""Launcher pieces that need no sandbox runtime: values, files, command lines, the relay."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import docker.errors
import pytest
import requests.exceptions

from agent_sdk.errors import ConfigError, EnvelopeError, SandboxError
from broker_gateway.gateway import AgentCredentials, Gateway
from broker_gateway.state import StateDir
from launchers import cli, sandbox_init
from launchers.backend import AGENT_UID, Limits, Sandbox, SandboxBackend, SandboxSpec
from launchers.credentials import remove_tree, write_launch_files
from launchers.docker_backend import DockerBackend, docker_errors, nats_host_port
from launchers.firecracker_backend import FirecrackerBackend
from launchers.firecracker_config import (
    FirecrackerVm,
    firecracker_argv,
    jailer_argv,
    vm_config,
)
from launchers.launch import Launcher, LaunchRequest
from launchers.process_backend import bwrap_argv
from launchers.qemu_command import Disk, QemuVm
from launchers.selection import choose_backend, default_backend
from launchers.vm_backend import launch_json

CREDS = AgentCredentials(
    "-----BEGIN NATS USER JWT-----\neyJ0eXAi.x.y\n------END NATS USER JWT------\n"
    "-----BEGIN USER NKEY SEED-----\nSUAFAKESEED\n------END USER NKEY SEED------\n",
    {
        "address": "docker.a1",
        "nats_url": "nats://127.0.0.1:5555",
        "inbox": "tier.docker.agent.a1.in",
    },
)


def spec(tmp_path: Path, **kw: object) -> SandboxSpec:
    values: dict[str, object] = {
        "tier": "docker",
        "agent_id": "a1",
        "command": ("python3", "/app/agent.py"),
        "root": tmp_path / "sandbox",
        "nats_url": "nats://127.0.0.1:4333",
    }
    values.update(kw)
    return SandboxSpec(**values)  # type: ignore[arg-type]


# -- values -------------------------------------------------------------------


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(SandboxError):
        Limits(memory_mb=16)
    with pytest.raises(SandboxError):
        Limits(cpus=0)
    assert Limits().memory_mb == 512


def test_spec_checks_names_and_command(tmp_path: Path) -> None:
    with pytest.raises(EnvelopeError):
        spec(tmp_path, agent_id="a.>")
    with pytest.raises(EnvelopeError):
        spec(tmp_path, tier="vm")
    with pytest.raises(SandboxError, match="no command"):
        spec(tmp_path, command=())
    env = spec(tmp_path, env={"MODE": "x"}).sandbox_env()
    assert env["SYMBIONT_NATS_URL"] == "nats://127.0.0.1:4222"
    assert env["SYMBIONT_AGENT_DIR"] == "/run/symbi"
    assert env["MODE"] == "x"


def test_sandbox_record_round_trip(tmp_path: Path) -> None:
    record = Sandbox("gvisor", "gvisor", "g1", tmp_path, {"container": "abc"}, 5)
    assert Sandbox.from_json(record.to_json()) == record
    with pytest.raises(SandboxError):
        Sandbox.from_json('{"backend": "vmware", "tier": "docker", "agent_id": "a", "root": "/"}')
    with pytest.raises(SandboxError):
        Sandbox.from_json("not json")


def test_backend_choice_never_weakens_a_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert default_backend("docker") == "docker"
    assert default_backend("gvisor") == "gvisor"
    assert default_backend("firecracker") == "microvm"  # no firecracker binary here
    assert choose_backend("docker", "microvm") == "microvm"
    with pytest.raises(SandboxError, match="weaker"):
        choose_backend("gvisor", "docker")
    with pytest.raises(SandboxError, match="weaker"):
        choose_backend("firecracker", "gvisor")
    with pytest.raises(SandboxError, match="not an isolation boundary"):
        choose_backend("docker", "process")
    assert choose_backend("firecracker", "process", allow_unsandboxed=True) == "process"
    with pytest.raises(SandboxError, match="unknown backend"):
        choose_backend("docker", "lxc")


# -- credential files ---------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to uid 10001 needs root")
def test_credentials_are_0600_for_the_sandbox_user_and_removed(tmp_path: Path) -> None:
    launch = tmp_path / "sandbox" / "launch"
    write_launch_files(launch, CREDS, "nats://127.0.0.1:4222", AGENT_UID, AGENT_UID)
    assert stat.S_IMODE(launch.stat().st_mode) == 0o500
    assert launch.stat().st_uid == AGENT_UID
    for name in ("agent.creds", "agent.json"):
        st = (launch / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (AGENT_UID, AGENT_UID)
    info = json.loads((launch / "agent.json").read_text())
    assert info["nats_url"] == "nats://127.0.0.1:4222"  # the sandbox's view, not the host's
    assert (launch / "agent.creds").read_text() == CREDS.creds
    with pytest.raises(SandboxError, match="already exists"):
        write_launch_files(launch, CREDS, "nats://127.0.0.1:4222", AGENT_UID, AGENT_UID)
    remove_tree(tmp_path / "sandbox")
    assert not (tmp_path / "sandbox").exists()


def test_credentials_for_the_own_user(tmp_path: Path) -> None:
    launch = tmp_path / "launch"
    write_launch_files(launch, CREDS, "nats://x:1", os.geteuid(), os.getegid())
    assert stat.S_IMODE((launch / "agent.creds").stat().st_mode) == 0o600
    remove_tree(launch)
    assert not launch.exists()
    remove_tree(launch)  # idempotent


# -- the relay and init inside sandboxes ----------------------------------------


def test_parse_address() -> None:
    assert sandbox_init.parse_address("tcp:127.0.0.1:4222") == ("tcp", "127.0.0.1", 4222)
    assert sandbox_init.parse_address("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
    assert sandbox_init.parse_address("vsock:2:4222") == ("vsock", "2", 4222)
    for bad in ("tcp:host", "udp:1:2", "unix:", "vsock:2:x"):
        with pytest.raises(ValueError, match="bad address"):
            sandbox_init.parse_address(bad)


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server that sends a greeting, then echoes one read back upper-cased."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"INFO {}\r\n")
                data = conn.recv(1024)
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def _init(
    *args: str, stdin: bytes | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-I", sandbox_init.__file__, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_run_relays_loopback_to_a_unix_socket_and_returns_the_status(
    tmp_path: Path, echo_server: int
) -> None:
    sock = tmp_path / "nats.sock"
    relay = subprocess.Popen(
        [
            sys.executable,
            "-I",
            sandbox_init.__file__,
            "relay",
            "--listen",
            f"unix:{sock}",
            "--connect",
            f"tcp:127.0.0.1:{echo_server}",
        ],
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            threading.Event().wait(0.05)
        port = socket.create_server(("127.0.0.1", 0))
        free = port.getsockname()[1]
        port.close()
        client = (
            f"import socket,sys; s=socket.create_connection(('127.0.0.1', {free}));"
            "hello=s.recv(100); s.sendall(b'ping'); print(hello, s.recv(100)); sys.exit(7)"
        )
        result = _init(
            "run",
            "--listen",
            f"tcp:127.0.0.1:{free}",
            "--connect",
            f"unix:{sock}",
            "--report-status",
            "--",
            sys.executable,
            "-c",
            client,
        )
    finally:
        relay.terminate()
        relay.wait()
    assert result.returncode == 7, result.stderr
    assert b"b'INFO {}\\r\\n' b'PING'" in result.stdout
    assert sandbox_init.STARTED.encode() in result.stderr
    assert b"symbi-exit-status: 7" in result.stderr


def test_run_reports_a_missing_command() -> None:
    result = _init("run", "--", "/no/such/program", "arg")
    assert result.returncode == sandbox_init.EXIT_CANNOT_RUN
    assert b"symbi-init: cannot run '/no/such/program'" in result.stderr


def test_pipe_joins_stdio_to_a_connection(echo_server: int) -> None:
    result = _init("pipe", "--connect", f"tcp:127.0.0.1:{echo_server}", stdin=b"hello")
    assert result.stdout == b"INFO {}\r\nHELLO"
    result = _init("pipe", "--connect", "tcp:127.0.0.1:1")
    assert result.returncode == 1
    assert b"cannot reach" in result.stderr


def test_bad_arguments() -> None:
    assert _init("relay", "--listen", "tcp:127.0.0.1:0").returncode == 2
    assert _init("explode").returncode == 2


# -- command lines and configurations -------------------------------------------


def test_qemu_network_reaches_only_the_nats_forward(tmp_path: Path) -> None:
    vm = QemuVm(
        name="symbi-firecracker-f1",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        disks=(Disk(tmp_path / "rootfs.ext4", "root"), Disk(tmp_path / "launch.ext4", "launch")),
        console=tmp_path / "console.log",
        pidfile=tmp_path / "vm.pid",
        forward_command=(
            "/usr/bin/python3",
            "-I",
            "/x/sandbox_init.py",
            "pipe",
            "--connect",
            "tcp:127.0.0.1:4333",
        ),
        memory_mb=256,
        cpus=1.5,
    )
    argv = vm.argv()
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == [
        "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:4222-cmd:/usr/bin/python3 -I "
        "/x/sandbox_init.py pipe --connect tcp:127.0.0.1:4333"
    ]
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert all(d.endswith(",readonly=on") for d in drives)
    assert argv[argv.index("-m") + 1] == "256M"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "tsc_early_khz=2400000" in argv[argv.index("-append") + 1]
    assert "elevateprivileges=deny" in argv[argv.index("-sandbox") + 1]
    assert "-daemonize" in argv and "-runas" not in argv
    with_runas = QemuVm(**{**vm.__dict__, "runas": "nobody"}).argv()
    assert with_runas[with_runas.index("-runas") + 1] == "nobody"
    assert "elevateprivileges=allow" in with_runas[with_runas.index("-sandbox") + 1]
    with pytest.raises(SandboxError, match="comma"):
        QemuVm(**{**vm.__dict__, "console": tmp_path / "a,b.log"}).argv()


def test_firecracker_config(tmp_path: Path) -> None:
    vm = FirecrackerVm(
        name="symbi-firecracker-f_1",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        disks=(Disk(tmp_path / "rootfs.ext4", "root"), Disk(tmp_path / "launch.ext4", "launch")),
        vsock_uds=tmp_path / "net" / "vsock.sock",
        memory_mb=384,
        cpus=0.5,
    )
    config = vm_config(vm)
    json.dumps(config)  # a valid --config-file document
    assert set(config) == {"boot-source", "drives", "machine-config", "network-interfaces", "vsock"}
    assert config["network-interfaces"] == []  # no NIC: NATS only through vsock
    assert config["vsock"] == {"guest_cid": 3, "uds_path": str(tmp_path / "net" / "vsock.sock")}
    assert config["machine-config"] == {"vcpu_count": 1, "mem_size_mib": 384, "smt": False}
    assert config["boot-source"]["kernel_image_path"] == str(tmp_path / "vmlinux")
    boot_args = config["boot-source"]["boot_args"].split()
    assert {"pci=off", "reboot=k", "console=ttyS0", "rdinit=/init"} <= set(boot_args)
    assert "reboot=t" not in boot_args
    assert [d["drive_id"] for d in config["drives"]] == ["root", "launch"]
    assert all(d["is_read_only"] and not d["is_root_device"] for d in config["drives"])
    # Firecracker's ids allow no underscore: a stable digest replaces the name.
    assert vm.instance_id.startswith("symbi-") and "_" not in vm.instance_id
    assert vm.relay_socket == tmp_path / "net" / "vsock.sock_4222"
    argv = firecracker_argv(tmp_path / "fc.json", vm)
    assert argv == [
        "firecracker",
        "--id",
        vm.instance_id,
        "--no-api",
        "--config-file",
        str(tmp_path / "fc.json"),
    ]
    jail = jailer_argv(vm, 10001, 10001, tmp_path / "jail")
    assert jail[jail.index("--uid") + 1] == "10001"
    assert jail[jail.index("--") + 1 :] == ["--no-api", "--config-file", "config.json"]


def test_firecracker_refuses_to_start_without_its_binary(tmp_path: Path) -> None:
    backend = FirecrackerBackend(binary="/nonexistent/firecracker")
    with pytest.raises(SandboxError, match=r"not packaged for Debian.*--backend microvm"):
        backend.check(spec(tmp_path, tier="firecracker"))


def test_launch_json_carries_no_secret(tmp_path: Path) -> None:
    doc = launch_json(spec(tmp_path, env={"K": "v"}), "vsock:2:4222")
    assert doc["uid"] == AGENT_UID
    assert doc["relay"] == {"listen": "tcp:127.0.0.1:4222", "connect": "vsock:2:4222"}
    assert "SEED" not in json.dumps(doc)


def test_bwrap_argv_unshares_everything(tmp_path: Path) -> None:
    argv = bwrap_argv(spec(tmp_path, app_dir=tmp_path), tmp_path / "rootfs")
    assert argv[:4] == ["bwrap", "--ro-bind", str(tmp_path / "rootfs"), "/"]
    for flag in ("--unshare-all", "--unshare-user", "--new-session", "--clearenv"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    binds = [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == "--ro-bind"]
    assert (str(tmp_path / "sandbox" / "launch"), "/run/symbi") in binds
    assert (str(tmp_path), "/app") in binds
    assert "--bind" not in argv  # nothing writable from the host
    assert argv[-2:] == ["python3", "/app/agent.py"]


def test_nats_url_parsing() -> None:
    assert nats_host_port("nats://127.0.0.1:4333") == ("127.0.0.1", 4333)
    assert nats_host_port("nats://localhost") == ("localhost", 4222)
    with pytest.raises(SandboxError):
        nats_host_port("http://x:1")


# -- error mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        docker.errors.ImageNotFound("no such image"),
        docker.errors.APIError("conflict"),
        docker.errors.DockerException("broken"),
        requests.exceptions.ConnectionError("refused"),
        PermissionError(13, "Permission denied"),
    ],
)
def test_docker_errors_become_sandbox_errors(exc: Exception) -> None:
    with pytest.raises(SandboxError) as info, docker_errors("doing it"):
        raise exc
    assert info.value.__cause__ is exc


def test_docker_down_is_a_sandbox_error() -> None:
    backend = DockerBackend(base_url="unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxError, match="Docker is not reachable"):
        backend.client()


# -- command line ---------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    agent = sub.add_parser("agent").add_subparsers(dest="agent_command")
    cli.add_parsers(agent)
    return parser.parse_args(["agent", *argv])


def test_cli_builds_a_launch_request(tmp_path: Path) -> None:
    args = parse(
        "launch",
        "--tier",
        "gvisor",
        "--id",
        "g1",
        "--app",
        str(tmp_path),
        "--env",
        "A=1",
        "--memory",
        "256",
        "--capability",
        "rpc",
        "--",
        "python3",
        "-m",
        "agent",
        "--",
        "x",
    )
    request = cli._request(args)
    assert request.backend == "gvisor"
    assert request.command == ("python3", "-m", "agent", "--", "x")
    assert request.env == {"A": "1"}
    assert request.limits.memory_mb == 256
    assert request.app_dir == tmp_path
    assert request.capabilities == ("rpc",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--tier", "docker", "--id", "a"), "no command"),
        (
            ("--tier", "docker", "--id", "a", "--image", "x", "--backend", "microvm", "--", "true"),
            "--image is for",
        ),
        (
            (
                "--tier",
                "firecracker",
                "--id",
                "a",
                "--rootfs",
                "/r",
                "--backend",
                "docker",
                "--",
                "true",
            ),
            "weaker",
        ),
        (
            ("--tier", "docker", "--id", "a", "--backend", "process", "--", "true"),
            "not an isolation boundary",
        ),
        (("--tier", "docker", "--id", "a", "--env", "NOVALUE", "--", "true"), "KEY=VALUE"),
        (("--tier", "docker", "--id", "A!", "--", "true"), "invalid agent id"),
    ],
)
def test_cli_refuses_bad_launches(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises((ConfigError, SandboxError, EnvelopeError), match=message):
        cli._request(parse("launch", *argv))


# -- the launcher's clean-up, with a backend that fails ---------------------------


class FailingBackend:
    """Starts nothing and cannot stop: what a dead Docker daemon looks like."""

    name = "docker"
    sandbox_uid = os.geteuid()
    sandbox_gid = os.getegid()

    def check(self, spec: SandboxSpec) -> None:
        pass

    def start(self, spec: SandboxSpec) -> Sandbox:
        raise SandboxError("start failed")

    def stop(self, sandbox: Sandbox, timeout: float = 10.0) -> None:
        raise SandboxError("stop failed")


class FakeGateway:
    url = "nats://127.0.0.1:4333"

    def __init__(self) -> None:
        self.revoked: list[tuple[str, str]] = []

    async def register_agent(self, tier: str, agent_id: str, **_: object) -> AgentCredentials:
        return CREDS

    async def revoke_agent(self, tier: str, agent_id: str) -> None:
        self.revoked.append((tier, agent_id))


def fake_launcher(tmp_path: Path) -> tuple[Launcher, FakeGateway]:
    gateway = FakeGateway()
    backend = FailingBackend()
    launcher = Launcher(
        StateDir.open(tmp_path / "state"),
        cast(Gateway, gateway),
        backends=lambda _name: cast(SandboxBackend, backend),
    )
    return launcher, gateway


async def test_a_failed_start_leaves_no_files_and_revokes(tmp_path: Path) -> None:
    launcher, gateway = fake_launcher(tmp_path)
    with pytest.raises(SandboxError, match="start failed"):
        await launcher.launch(LaunchRequest("docker", "a1", ("true",), "docker"))
    assert not launcher.root("docker", "a1").exists()
    assert gateway.revoked == [("docker", "a1")]


async def test_a_failed_stop_still_removes_and_revokes_the_credentials(tmp_path: Path) -> None:
    launcher, gateway = fake_launcher(tmp_path)
    root = launcher.root("docker", "a1")
    root.mkdir(parents=True)
    write_launch_files(root / "launch", CREDS, "nats://x:1", os.geteuid(), os.getegid())
    (root / "sandbox.json").write_text(Sandbox("docker", "docker", "a1", root).to_json())
    with pytest.raises(SandboxError, match="stop failed"):
        await launcher.stop("docker", "a1")
    assert not (root / "launch").exists()
    assert (root / "sandbox.json").exists()  # kept, for another try
    assert gateway.revoked == [("docker", "a1")]
