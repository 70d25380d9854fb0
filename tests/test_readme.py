"""The README says what the code does: every error code exactly as the core defines it, the
quick start's two commands, and a walk-through whose every line a new user can paste: each
``devstream`` command parses, each variable is defined before use, no two steps listen on one
port, no example runs two clients under one device id, ssh hands the ProxyCommand the device
id and the connection string, and the walk-through, pasted into bash with the installed
console script, logs in with ssh through its ProxyCommand and through a local forward (to a
throwaway sshd), serves a page through the hub, and stops what it started.

Child processes use 127.0.0.1 only (the walk-through's ports replaced by free ones; the sshd
gets a just-released one), each wait under a trio ``fail_after``, none on the clock."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from devstream_core.errors import ErrorCode
from devstream_trio.cli import build_parser
from devstream_trio.cli.config import apply_config
from devstream_trio.cli.options import parse_listen
from devstream_trio.client.proxy import parse_forward, parse_map

from ._helpers import Output, free_port, start_process
from .conftest import require_tool
from .test_proxy_e2e import start_sshd

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_error_code_is_in_the_readme_table() -> None:
    rows = re.findall(
        r"^\| (\d{6}) \| (\d{3}) \| (\d{4}) \| `([A-Z_]+)` \|", README.read_text(), re.MULTILINE
    )
    documented = {int(code): (int(status), int(close), name) for code, status, close, name in rows}
    expected = {int(c): (c.http_status, c.close_code, c.name) for c in ErrorCode}
    assert documented == expected


def test_quick_start_has_exactly_two_commands() -> None:
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, re.DOTALL)
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/devstream demo",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip\" install --quiet -e '.[test]'" in ci and 'pytest" -q --cov ' in ci


# -- the walk-through: shell commands as a user pastes them ------------------------------------

WALKTHROUGH = "SSH to a device"
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>"}
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")


@dataclass(frozen=True)
class Command:
    """One simple shell command: its words after any ``NAME=value`` prefix, whether it runs
    in the background (``&``), and the variables it sets (``export``, or the prefix)."""

    words: list[str]
    background: bool
    sets: dict[str, str]
    line: str


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def fenced(text: str, lang: str = "sh") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", text, re.DOTALL)


def commands(block: str) -> list[Command]:
    """The simple commands of a shell block, in order."""
    found: list[Command] = []
    for line in block.replace("\\\n", " ").splitlines():
        found += line_commands(line)
    return found


def line_commands(line: str) -> list[Command]:
    """The simple commands of one line, those inside ``$(…)`` first; a substitution stays in
    its command's words (and values) as ``$(…)``."""
    inner = SUBSTITUTION.findall(line)
    found = [command for text in inner for command in line_commands(text)]
    numbers = iter(range(len(inner)))
    plain = SUBSTITUTION.sub(lambda _: f"SUBSTITUTION{next(numbers)}", line)
    lexer = shlex.shlex(plain, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True

    def restore(word: str) -> str:
        return re.sub(r"SUBSTITUTION(\d+)", lambda m: f"$({inner[int(m[1])]})", word)

    current: list[str] = []
    skip = False
    for token in [*lexer, ";"]:
        if skip:
            skip = False
        elif token in REDIRECTS:
            skip = True
        elif token in SEPARATORS:
            if current:
                found.append(simple([restore(w) for w in current], token == "&", line))
            current = []
        else:
            current.append(token)
    return found


def simple(words: list[str], background: bool, line: str) -> Command:
    sets: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        sets[name] = value
    if words[:1] == ["export"]:
        for assignment in words[1:]:
            name, _, value = assignment.partition("=")
            sets[name] = value
        words = []
    return Command(words, background, sets, line)


def proxy_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(host, words)`` of each ssh ProxyCommand in *text*: in an ``ssh -o`` command line and
    in an ssh_config block; ``%h``, ``%p`` and ``%r`` replaced as ssh replaces them."""
    found: list[tuple[str, str]] = []
    for block in fenced(text):
        for command in commands(block):
            if command.words[:1] == ["ssh"]:
                destination = command.words[-1]
                for i, word in enumerate(command.words):
                    if word == "-o" and command.words[i + 1].startswith("ProxyCommand="):
                        proxy = command.words[i + 1].removeprefix("ProxyCommand=")
                        found.append((destination, proxy))
    for block in fenced(text, "text"):
        host = re.search(r"^Host (\S+)$", block, re.MULTILINE)
        proxy = re.search(r"^\s+ProxyCommand (.+)$", block, re.MULTILINE)
        if host and proxy:
            found.append((host[1], proxy[1]))
    result = []
    for destination, proxy in found:
        user, _, host = destination.rpartition("@")
        expanded = proxy.replace("%h", host).replace("%p", "22").replace("%r", user or "user")
        result.append((host, shlex.split(expanded)))
    return result


def unwrapped(words: list[str]) -> list[str]:
    """*words* without ``sudo [-u USER]`` or ``docker exec CONTAINER`` in front."""
    if words[:1] == ["sudo"]:
        words = words[3:] if words[1:2] == ["-u"] else words[1:]
    if words[:2] == ["docker", "exec"]:
        words = words[3:]
    return words


def devstream_argvs(text: str) -> list[list[str]]:
    """The arguments of every ``devstream`` command line in *text*'s shell blocks, including
    those in ``$(…)``, after ``sudo`` or ``docker exec``, and in ssh ProxyCommands."""
    argvs = [
        unwrapped(c.words)[1:]
        for block in fenced(text)
        for c in commands(block)
        if unwrapped(c.words)[:1] == ["devstream"]
    ]
    argvs += [words[1:] for _, words in proxy_commands(text) if words[:1] == ["devstream"]]
    return argvs


def _argv_param(argv: list[str]) -> Any:
    return pytest.param(argv, id=" ".join(argv[:3]))


def test_walkthrough_has_the_steps_a_new_user_needs() -> None:
    argvs = devstream_argvs(section(WALKTHROUGH))
    firsts = [" ".join(a[:2]) for a in argvs]
    for expected in (
        "hub --data",
        "connection-string --data",
        "device create",
        "proxy device",
        "proxy stdio",
        "proxy service",
    ):
        assert expected in firsts
    assert firsts.count("proxy device") == 1  # one agent for the device id, several --map
    (agent,) = [a for a in argvs if a[:2] == ["proxy", "device"]]
    assert agent.count("--map") >= 2


@pytest.mark.parametrize("argv", [_argv_param(a) for a in devstream_argvs(section(WALKTHROUGH))])
def test_walkthrough_command_parses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"devstream {' '.join(argv)}: {capsys.readouterr().err}")
    assert args.command == argv[0]
    if "--connection-string" in argv:
        # The shell's quotes kept the variable whole: one word, expanded at run time.
        assert re.fullmatch(r"\$CS_[A-Z]+", args.connection_string)


def readme_examples() -> str:
    """Every shell block of the README but the command-line synopsis (``[--flag …]``)."""
    blocks = [b for b in fenced(README.read_text()) if "[--" not in b]
    return "\n".join(f"```sh\n{b}\n```" for b in blocks)


@pytest.mark.parametrize(
    "argv",
    [_argv_param(a) for a in devstream_argvs(readme_examples()) if a[:1] != ["demo"]],
)
def test_readme_example_parses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"devstream {' '.join(argv)}: {capsys.readouterr().err}")
    assert args.command == argv[0]


def test_readme_deploys_the_files_the_repository_has() -> None:
    text = section("Operating it")
    paths = set(re.findall(r"packaging/[\w./@-]+\w", text))
    assert "packaging/systemd/devstream-hub.service" in paths
    for path in paths:
        assert (README.parent / path).exists(), path
    for name in re.findall(r"`(devstream[\w.@-]*\.(?:service|sysusers))`", text):
        assert (README.parent / "packaging" / "systemd" / name).exists(), name


def test_readme_docker_run_matches_the_image() -> None:
    """``docker run`` publishes the port the image exposes, mounts its volume, and what follows
    the image name is accepted after the image's entrypoint."""
    text = section("Operating it")
    (build,) = [
        c.words for b in fenced(text) for c in commands(b) if c.words[:2] == ["docker", "build"]
    ]
    (run,) = [
        c.words for b in fenced(text) for c in commands(b) if c.words[:2] == ["docker", "run"]
    ]
    image = build[build.index("-t") + 1]
    dockerfile = (README.parent / "Dockerfile").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.MULTILINE)
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.MULTILINE)
    (volume,) = re.findall(r"^VOLUME (.+)$", dockerfile, re.MULTILINE)
    assert run[run.index("-p") + 1].endswith(f":{exposed}")
    assert run[run.index("-v") + 1].split(":")[1] == json.loads(volume)[0]
    extra = run[len(run) - run[::-1].index(image) :]  # after the image (the last such word)
    args = build_parser().parse_args(json.loads(entrypoint)[1:] + extra)
    assert args.command == "hub" and args.public_url == "http://hub.example.com:8080"


def test_walkthrough_defines_each_variable_before_it_is_used() -> None:
    text = section(WALKTHROUGH)
    defined: set[str] = {"USER"}
    for block in fenced(text):
        for command in commands(block):
            used = set(re.findall(r"\$([A-Z_]+)", " ".join(command.words)))
            assert used <= defined, f"{command.line}: {used - defined} not defined yet"
            defined |= command.sets.keys()
    # A ProxyCommand runs in a child shell: what it reads must be exported, as step 2 does.
    exported = {
        name
        for block in fenced(text)
        for line in block.splitlines()
        for name in re.findall(r"^export ([A-Z_]+)=", line)
    }
    for _, words in proxy_commands(text):
        assert set(re.findall(r"\$([A-Z_]+)", " ".join(words))) <= exported


def test_walkthrough_ports_do_not_clash() -> None:
    text = section(WALKTHROUGH)
    listening: list[int] = []
    targets: list[int] = []
    for block in fenced(text):
        for command in commands(block):
            words = command.words
            if words[:1] == ["devstream"] and words[1:2] == ["hub"]:
                listening.append(parse_listen(build_parser().parse_args(words[1:]).listen)[1])
            elif words[:3] == ["python3", "-m", "http.server"]:
                listening.append(int(words[3]))
            elif words[:1] == ["devstream"]:
                args = build_parser().parse_args(words[1:])
                listening += [parse_forward(f).port for f in getattr(args, "forward", [])]
                targets += [parse_map(m).port for m in getattr(args, "map", [])]
    assert len(listening) == len(set(listening)), listening
    # The ports the introduction asks to be free are the ones the steps listen on.
    intro = re.search(r"an `sshd` on port (\d+), and ports (.*?) free", text, re.DOTALL)
    assert intro
    assert sorted(int(p) for p in re.findall(r"\b\d{4}\b", intro[2])) == sorted(listening)
    # The agent's targets are the sshd and a server the walk-through starts.
    assert set(targets) <= {int(intro[1]), *listening}


def test_no_example_leaves_a_device_running_under_an_id_another_one_uses() -> None:
    """Two clients with one device id push each other off the hub: no example may leave a
    device (``echo device``, ``proxy device``) running in the background and start another
    one with the same credentials before stopping it (``kill $!``, ``kill $(jobs -p)``)."""
    device_of: dict[str, str] = {}
    running: dict[str, str] = {}
    last_background: str | None = None
    for block in fenced(README.read_text()):
        for command in commands(block):
            words = command.words
            for name, value in command.sets.items():
                if match := re.search(r"devstream device create (\S+)", value):
                    device_of[name] = match[1]
            if words[:2] == ["kill", "$!"] and last_background is not None:
                running.pop(last_background, None)
            elif words[:2] == ["kill", "$(jobs -p)"]:
                running.clear()
            if words[:1] != ["devstream"] or words[2:3] != ["device"]:
                if command.background:
                    last_background = None
                continue
            if words[1] not in ("echo", "proxy"):
                continue
            credential = command.sets.get("DEVSTREAM_CONNECTION_STRING", "")
            if "--connection-string" in words:
                credential = words[words.index("--connection-string") + 1]
            variable = re.sub(r"[<>$'\"{}]", "", credential)
            key = device_of.get(variable, variable)
            assert key not in running, (
                f"{command.line!r} starts a second client for {key!r} while "
                f"{running.get(key)!r} still runs"
            )
            if command.background:
                running[key] = command.line
                last_background = key


async def test_proxy_command_reaches_devstream_as_written(tmp_path: Path) -> None:
    """ssh runs the README's ProxyCommands (its command line and its ssh_config block) with
    ``%h`` as the device id and ``$CS_OWNER`` expanded by its shell: a stand-in ``devstream``
    on the PATH records the arguments it gets."""
    require_tool("ssh")
    text = section(WALKTHROUGH)
    ssh_line = next(
        line for block in fenced(text) for line in block.splitlines() if "ProxyCommand=" in line
    )
    (config,) = [b for b in fenced(text, "text") if "ProxyCommand" in b]
    (tmp_path / "ssh_config").write_text(config + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "devstream"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['ARGV_OUT'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    stub.chmod(0o755)
    owner = "HostName=127.0.0.1:8080;SharedAccessKeyName=iothubowner;SharedAccessKey=a+b/c="
    out = tmp_path / "argv.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "USER": "someone",
        "SHELL": "/bin/sh",
        "CS_OWNER": owner,
        "ARGV_OUT": str(out),
    }
    with trio.fail_after(30):
        for argv in (
            ["/bin/sh", "-c", ssh_line],
            ["ssh", "-F", str(tmp_path / "ssh_config"), "someone@my-device"],
        ):
            # ssh fails (the stand-in speaks no SSH) once the ProxyCommand has run.
            await trio.run_process(argv, env=env, check=False, capture_stderr=True, stdin=b"")
    expected = ["proxy", "stdio", "--device", "my-device", "--name", "ssh"]
    recorded = [json.loads(line) for line in out.read_text().splitlines()]
    assert recorded == [[*expected, "--connection-string", owner]] * 2


def runs_until_stopped(words: list[str]) -> bool:
    """Whether *words* start a program that serves until it is stopped."""
    if words[:3] == ["python3", "-m", "http.server"]:
        return True
    servers = (["hub"], ["proxy", "device"], ["proxy", "service"], ["echo", "device"])
    return words[:1] == ["devstream"] and any(words[1 : 1 + len(s)] == s for s in servers)


def test_a_server_in_the_foreground_ends_its_block() -> None:
    """Pasted, a block goes on only once its commands return: a server or proxy followed by
    more lines for the same machine (a ``# on …`` comment starts another) runs with ``&``."""
    for block in fenced(readme_examples()):
        for part in re.split(r"^# on .*$", block, flags=re.MULTILINE):
            found = commands(part)
            for command in found[:-1]:
                assert command.background or not runs_until_stopped(command.words), command.line


def test_the_readme_config_file_is_accepted(tmp_path: Path) -> None:
    """The README's ``--config`` example gives each proxy its settings."""
    (block,) = re.findall(r"```toml\n(.*?)\n *```", README.read_text(), re.DOTALL)
    path = tmp_path / "devstream.toml"
    path.write_text(textwrap.dedent(block) + "\n")
    settings = {}
    for role in ("device", "service", "stdio"):
        args = build_parser().parse_args(["proxy", role, "--config", str(path)])
        apply_config(args)
        settings[role] = (args.map, args.device, args.forward, args.name)
    assert settings == {
        "device": (["ssh=127.0.0.1:22", "web=127.0.0.1:80"], None, [], None),
        "service": ([], "my-device", ["127.0.0.1:2222=ssh"], None),
        "stdio": ([], "my-device", [], "ssh"),
    }


def with_ssh_options(line: str, options: list[str], remote: str) -> str:
    """The README's ``ssh …`` *line* with *options* after ``ssh`` and *remote* (a command
    for the server to run, so that ssh returns) at its end; the rest as written."""
    assert line.startswith("ssh "), line
    return f"ssh {shlex.join(options)} {line.removeprefix('ssh ')} {shlex.quote(remote)}"


async def test_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The whole walk-through and the echo check, pasted line by line into one bash (the hub
    in a process of its own, as in its own terminal), ``devstream`` being the installed
    console script. Only what this machine forces is changed: each port is a free one (the
    hub given ``--listen`` for it), the agent's ``ssh`` target is a throwaway sshd, and each
    ``ssh`` line gets that sshd's client key, its host key as the only known host, batch mode,
    standard input from ``/dev/null`` and a command to run. The ProxyCommand is the README's
    own, on the command line and as its ``~/.ssh/config`` block (given with ``-F``). ssh logs
    in through the ProxyCommand and through the local forward, a page comes back from the
    "device", step 6 stops every background job, and Ctrl-C stops the hub."""
    require_tool("bash", "curl", "ssh", "sshd", "ssh-keygen")
    blocks = fenced(section(WALKTHROUGH))
    ports = {port: free_port() for port in (8080, 8000, 2222, 8081)}
    user = pwd.getpwuid(os.geteuid()).pw_name  # the one user a throwaway sshd logs in
    console_script = Path(sys.executable).parent / "devstream"
    assert console_script.is_file()

    def block_with(needle: str) -> str:
        (block,) = [b for b in blocks if needle in b]
        return block

    def line_with(block: str, start: str) -> str:
        (line,) = [line for line in block.splitlines() if line.startswith(start)]
        return line

    echo_blocks = fenced(section("Command line"))
    (start_echo,) = [b for b in echo_blocks if "echo device --connection-string" in b]
    (use_echo,) = [b for b in echo_blocks if "echo service --device echo-box" in b]
    (ssh_config,) = [b for b in fenced(section(WALKTHROUGH), "text") if "ProxyCommand" in b]
    agent = block_with("proxy device")
    assert agent.count("--map ssh=127.0.0.1:22 ") == 1

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "devstream").symlink_to(console_script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTREAM_")}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "USER": user,
        "SHELL": "/bin/sh",  # what ssh runs a ProxyCommand with
        "PYTHONPATH": str(README.parent / "src"),
        "NO_PROXY": "*",
    }
    hub_argv = shlex.split(block_with("devstream hub"))
    assert hub_argv[:2] == ["devstream", "hub"] and "--listen" not in hub_argv
    hub_argv = [*hub_argv, "--listen", f"127.0.0.1:{ports[8080]}"]
    in_folder = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(tmp_path)]
    bash = await trio.lowlevel.open_process(
        ["bash"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # its background jobs in a group of their own, for cleanup
    )
    assert bash.stdin is not None and bash.stdout is not None
    shell = Output(bash.stdout)

    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                sshd = await start_sshd(nursery, tmp_path / "sshd")
                known_hosts = tmp_path / "known_hosts"
                known_hosts.write_text(
                    f"my-device,[127.0.0.1]:{ports[2222]} {sshd.host_public_key}\n"
                )
                ssh_options = [
                    *("-i", str(sshd.client_key), "-o", "IdentitiesOnly=yes"),
                    *("-o", f"UserKnownHostsFile={known_hosts}"),
                    *("-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-n"),
                ]
                inline = ["-F", "/dev/null", *ssh_options]  # no ssh configuration file
                (tmp_path / "ssh_config").write_text(ssh_config + "\n")

                def local(text: str) -> str:
                    """*text* with the machine's ports for the README's."""
                    text = text.replace("ssh=127.0.0.1:22 ", f"ssh=127.0.0.1:{sshd.port} ")
                    return re.sub(
                        r"\b(8080|8000|2222|8081)\b", lambda m: str(ports[int(m[1])]), text
                    )

                async def paste(block: str, until: str) -> list[str]:
                    """Paste *block* into the shell; the lines it printed up to the first
                    that contains *until*."""
                    assert bash.stdin is not None
                    start = len(shell.lines)
                    await bash.stdin.send_all(local(block).encode() + b"\n")
                    try:
                        await shell.until(until)
                    except trio.Cancelled:
                        print("the shell printed:", *shell.lines, sep="\n  ")
                        raise
                    return shell.lines[start:]

                async def ssh(line: str, expected: str) -> None:
                    """Run an ``ssh`` line: it prints *expected* and exits 0."""
                    out = await paste(f"{line}\necho ssh-exit=$?", "ssh-exit=")
                    assert expected in out and out[-1] == "ssh-exit=0", out

                # 1. The hub, in a terminal of its own.
                hub, hub_output = await start_process(nursery, in_folder + hub_argv, env)
                await hub_output.until("devstream hub listening on")
                # 2. The device and the variables.
                await paste(block_with("export CS_OWNER") + "\necho defined", "defined")
                # 3. The agent and the web server.
                await paste(agent, "device 'my-device' online")
                # The echo check beside it, under an id of its own, stopped after.
                await paste(start_echo, "device 'echo-box' online")
                assert (await paste(use_echo, "received: "))[-1] == "received: hello"
                # 4. ssh with the README's ProxyCommand, on the command line ...
                step4 = line_with(block_with("ProxyCommand="), "ssh ")
                line = with_ssh_options(step4, inline, "echo via-pc")
                await ssh(line, "via-pc")
                # ... and in an ssh configuration file.
                options = ["-F", str(tmp_path / "ssh_config"), *ssh_options]
                line = with_ssh_options('ssh "$USER@my-device"', options, "echo via-config")
                await ssh(line, "via-config")
                # 5. The local forwards, then ssh and curl through them.
                await paste(block_with("proxy service"), "'web' on device 'my-device'")
                step5 = block_with("curl")
                line = with_ssh_options(line_with(step5, "ssh "), inline, "echo via-forward")
                await ssh(line, "via-forward")
                curl = line_with(step5, "curl ")
                assert (await paste(curl, "hello"))[-1] == "hello from my-device"
                # 6. Every background job stops (each killed by the signal, none gone before).
                running = await paste("pids=$(jobs -pr); jobs -r; echo listed", "listed")
                assert len(running) == 4, running
                for command in ("http.server", "proxy device", "proxy service"):
                    assert sum(command in job for job in running) == 1, running
                stopped = await paste(
                    block_with("kill $(jobs -p)")
                    + '\nfor p in $pids; do wait "$p"; echo "exit $?"; done; jobs -r; echo done',
                    "done",
                )
                # Each exits by the signal; no job is left (``jobs -r`` lists none).
                assert [line for line in stopped if line.startswith(("exit", "["))] == [
                    "exit 143"
                ] * 3, stopped
                # Then the hub, with Ctrl-C.
                hub.send_signal(signal.SIGINT)
                await hub_output.drain()
                assert await hub.wait() == 130
                assert not [line for line in hub_output.lines if "Traceback" in line]
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bash.pid, signal.SIGKILL)
        await bash.wait()
    # Three logins, each through the sshd (and nothing else logged in).
    accepted = [line for line in sshd.output.lines if "Accepted publickey" in line]
    assert len(accepted) == 3, sshd.output.lines
    assert all(f" for {user} from 127.0.0.1 " in line for line in accepted), accepted
