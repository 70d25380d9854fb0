"""The files that deploy devstream: the systemd units, the hub's container image, the licence.

Each is tried as far as this machine allows without root or a container engine:

* the units pass ``systemd-analyze verify`` (with ``ExecStart`` pointed at a program that
  exists) and ``systemd-analyze security`` rates them "OK"; skipped where systemd is absent;
* each ``ExecStart``, expanded as systemd would with the unit's own environment, is a command
  line the real ``devstream`` parser accepts;
* the ``Dockerfile``'s build context (its ``COPY`` sources, less ``.dockerignore``) builds the
  package, and its ``ENTRYPOINT`` and ``CMD`` run a hub whose ``HEALTHCHECK`` command passes.

Hubs run as child processes on 127.0.0.1, port 0, each wait under a trio ``fail_after``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devstream_core.routes import Health, parse_route
from devstream_trio.cli import build_parser
from devstream_trio.cli.options import parse_listen
from devstream_trio.client.proxy import parse_map

from ._helpers import start_process

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "packaging" / "systemd"
HUB_UNIT = UNITS / "devstream-hub.service"
DEVICE_UNIT = UNITS / "devstream-device@.service"
SYSUSERS = UNITS / "devstream.sysusers"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
#: Where the units expect ``pip install`` to have put the command.
UNIT_BINARY = "/usr/local/bin/devstream"
TIMEOUT = 30
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze here")


# -- reading a unit file ----------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` to every value it is given, in order (keys may repeat in a unit)."""
    settings: dict[str, list[str]] = {}
    section = ""
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    """The variables the unit's ``Environment=`` lines set."""
    env: dict[str, str] = {}
    for value in settings.get("Service.Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def header_example(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of the example environment file in a unit's header comment."""
    example: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if match := re.fullmatch(r"#\s+(DEVSTREAM_[A-Z_]+)=(.*)", line):
            example[match[1]] = match[2]
    return example


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """An ``ExecStart=`` line as systemd splits and expands it: ``${NAME}`` is one word,
    ``$NAME`` alone as a word becomes its value split at white space (none if unset)."""
    words: list[str] = []
    for word in shlex.split(command):
        if match := re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word):
            words += env.get(match[1], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return words


# -- the units --------------------------------------------------------------------------------


def verifiable_copy(unit: Path, tmp_path: Path) -> Path:
    """*unit* copied into *tmp_path* with ``ExecStart`` pointing at a program that exists
    (``verify`` refuses a unit whose binary is missing, as on a machine without devstream)."""
    program = tmp_path / "bin" / "devstream"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = unit.read_text()
    assert f"ExecStart={UNIT_BINARY} " in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"ExecStart={UNIT_BINARY} ", f"ExecStart={program} "))
    return copy


def as_instance(unit: Path, instance: str = "my-device") -> Path:
    """A template unit's path as an instance (``name@.service`` to ``name@INSTANCE.service``)."""
    return unit.with_name(unit.name.replace("@.", f"@{instance}."))


@needs_systemd
@pytest.mark.parametrize("unit", [HUB_UNIT, DEVICE_UNIT], ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    copy = as_instance(verifiable_copy(unit, tmp_path))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=TIMEOUT
    )
    # verify exits 0 even for an unknown key or a bad value: it only warns, naming the file.
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(tmp_path) in line or unit.name in line
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []


@needs_systemd
def test_verify_would_catch_a_mistyped_setting(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    copy = verifiable_copy(HUB_UNIT, tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=", "ProtectSystm="))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert "ProtectSystm" in result.stderr


@needs_systemd
@pytest.mark.parametrize("unit", [HUB_UNIT, DEVICE_UNIT], ids=lambda p: p.name)
def test_unit_exposure_is_low(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze security`` rates the sandbox at most 2.5 of 10 ("OK")."""
    copy = as_instance(verifiable_copy(unit, tmp_path))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", str(copy)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if "--offline" in result.stderr:  # systemd older than 250 rates running units only
        pytest.skip("this systemd-analyze cannot rate a unit file")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


def test_hub_unit_keeps_its_data_in_its_state_directory() -> None:
    settings = unit_settings(HUB_UNIT)
    env = unit_environment(settings)
    state = one(settings, "Service.StateDirectory")
    assert env["DEVSTREAM_DATA"] == f"/var/lib/{state}"
    assert one(settings, "Service.StateDirectoryMode") == "0700"
    # A user of its own: the one the sysusers file creates (or one made on the fly).
    user = settings.get("Service.User", [])
    if user:
        sysusers = [line.split() for line in SYSUSERS.read_text().splitlines()]
        assert ["u", user[0]] in [fields[:2] for fields in sysusers]
    else:
        assert one(settings, "Service.DynamicUser") == "yes"


@pytest.mark.parametrize("unit", [HUB_UNIT, DEVICE_UNIT], ids=lambda p: p.name)
def test_unit_is_sandboxed(unit: Path) -> None:
    settings = unit_settings(unit)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one(settings, f"Service.{key}") == value, key
    assert "network-online.target" in one(settings, "Unit.After")
    assert "network-online.target" in one(settings, "Unit.Wants")
    assert one(settings, "Install.WantedBy") == "multi-user.target"


def test_hub_unit_restarts_on_failure_with_many_files() -> None:
    settings = unit_settings(HUB_UNIT)
    assert one(settings, "Service.Restart") == "on-failure"
    # Two sockets a stream: the hub raises its soft limit to this hard limit at start.
    assert int(one(settings, "Service.LimitNOFILE")) >= 65536


def test_device_unit_always_restarts_and_keeps_its_key_out_of_the_command_line() -> None:
    settings = unit_settings(DEVICE_UNIT)
    assert one(settings, "Service.Restart") == "always"
    assert one(settings, "Unit.StartLimitIntervalSec") == "0"  # never gives up
    env_file = one(settings, "Service.EnvironmentFile")
    assert "%i" in env_file and not env_file.startswith("-")  # no file, no start
    command = one(settings, "Service.ExecStart")
    assert "--connection-string" not in command and "SharedAccessKey" not in command
    assert "SharedAccessKey" in header_example(DEVICE_UNIT)["DEVSTREAM_CONNECTION_STRING"]


def test_hub_unit_command_line_parses() -> None:
    settings = unit_settings(HUB_UNIT)
    argv = expand_exec(one(settings, "Service.ExecStart"), unit_environment(settings))
    assert argv[0] == UNIT_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "hub"
    assert parse_listen(args.listen) == ("0.0.0.0", 8080)
    assert args.public_url == "http://localhost:8080"


def test_hub_unit_command_line_parses_with_the_header_example() -> None:
    settings = unit_settings(HUB_UNIT)
    env = unit_environment(settings) | header_example(HUB_UNIT)
    argv = expand_exec(one(settings, "Service.ExecStart"), env)
    args = build_parser().parse_args(argv[1:])
    assert args.public_url == "https://hub.example.com"
    assert args.tls_cert == "/etc/devstream/cert.pem"
    assert args.tls_key == "/etc/devstream/key.pem"


def test_device_unit_command_line_parses_with_the_header_example() -> None:
    settings = unit_settings(DEVICE_UNIT)
    argv = expand_exec(one(settings, "Service.ExecStart"), header_example(DEVICE_UNIT))
    assert argv[0] == UNIT_BINARY
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.role) == ("proxy", "device")
    assert [parse_map(text).name for text in args.map] == ["ssh", "web"]
    assert args.connection_string is None  # taken from DEVSTREAM_CONNECTION_STRING


# -- the container image ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not logical, "the Dockerfile ends inside a continuation"
    return instructions


def dockerfile_args(keyword: str) -> list[str]:
    found = [rest for kw, rest in dockerfile() if kw == keyword]
    assert found, f"no {keyword} in the Dockerfile"
    return found


def exec_form(text: str) -> list[str]:
    """A JSON ("exec") form; the shell form would put ``/bin/sh -c`` in front."""
    words = json.loads(text)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), text
    return words


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in dockerfile_args("ENV"):
        for assignment in shlex.split(rest):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def copy_sources() -> list[str]:
    sources: list[str] = []
    for rest in dockerfile_args("COPY"):
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(rest))
        sources += words[:-1]
    return sources


def hub_command() -> list[str]:
    """``ENTRYPOINT`` then ``CMD``: what the container runs given no arguments."""
    (entrypoint,) = dockerfile_args("ENTRYPOINT")
    (cmd,) = dockerfile_args("CMD")
    return exec_form(entrypoint) + exec_form(cmd)


def healthcheck_command() -> list[str]:
    (rest,) = dockerfile_args("HEALTHCHECK")
    _, _, command = rest.partition(" CMD ")
    return exec_form(command.strip())


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` as (exclude?, pattern), read as Docker does: each pattern is a path
    from the root of the context; ``*`` and ``?`` stay within one path segment, ``**`` spans
    any number of them; ``!`` makes an exception; the last pattern that matches decides."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exclude, re.compile(regex)))
    return patterns


def is_ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether *relative* (a path in the context) is left out of the build context: a pattern
    that matches one of its parent folders matches it too."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exclude, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = exclude
    return ignored


def context_files() -> Iterator[str]:
    """Every file the ``COPY`` lines take from the context, as context-relative paths."""
    patterns = ignore_patterns()
    for source in copy_sources():
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not is_ignored(relative, patterns):
                yield relative


def test_dockerignore_reading() -> None:
    """The reading of ``.dockerignore`` above, on patterns of each kind."""
    patterns = ignore_patterns()
    assert is_ignored(".git", patterns)
    assert is_ignored("tests/test_packaging.py", patterns)
    assert is_ignored("src/devstream_trio/__pycache__/cli.cpython-311.pyc", patterns)
    assert is_ignored("src/devstream.egg-info/PKG-INFO", patterns)
    assert not is_ignored("src/devstream_trio/cli/__init__.py", patterns)
    assert not is_ignored("README.md", patterns)


def test_copy_sources_are_in_the_build_context() -> None:
    patterns = ignore_patterns()
    sources = copy_sources()
    assert {"pyproject.toml", "README.md", "LICENSE", "src"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not is_ignored(source, patterns), f"{source} is in .dockerignore"
    files = set(context_files())
    for package in ("devstream_core", "devstream_trio", "devstream_asyncio"):
        for module in (ROOT / "src" / package).rglob("*.py"):
            if "__pycache__" not in module.parts:
                assert module.relative_to(ROOT).as_posix() in files
        assert f"src/{package}/py.typed" in files


def test_build_context_builds_the_package(tmp_path: Path) -> None:
    """The files the image copies, and only those, make a complete source distribution: the
    metadata (with README.md, which pyproject.toml names), every module, the console script."""
    context = tmp_path / "context"
    for relative in context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    out = tmp_path / "dist"
    out.mkdir()
    build = (
        "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sdist = out / result.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        top = sdist.name.removesuffix(".tar.gz")
        entry_points = tar.extractfile(f"{top}/src/devstream.egg-info/entry_points.txt")
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert entry_points is not None and pkg_info is not None
        scripts = entry_points.read().decode()
        metadata = pkg_info.read().decode()
    # The SPDX form (PEP 639); the older license table is deprecated and warned about.
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata
    assert "DeprecationWarning" not in result.stderr, result.stderr[-2000:]
    assert "Description-Content-Type: text/markdown" in metadata
    assert "## Quick start" in metadata  # the README is the long description
    assert "src/devstream_trio/cli/__init__.py" in names
    assert "src/devstream_core/routes.py" in names
    assert "LICENSE" in names
    assert "devstream = devstream_trio.cli:main" in scripts


def test_image_base_is_a_slim_python_the_project_supports() -> None:
    (base,) = dockerfile_args("FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim(?:-[a-z]+)?", base)
    assert match, base
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=3\.(\d+)", requires)
    assert minimum and int(match[1]) >= int(minimum[1])


def test_image_runs_the_hub_as_a_user_with_a_data_volume() -> None:
    (user,) = dockerfile_args("USER")
    assert user.split(":")[0] not in ("root", "0")
    data = image_env()["DEVSTREAM_DATA"]
    (volume,) = dockerfile_args("VOLUME")
    assert exec_form(volume) == [data]
    # The folder the volume starts from belongs to that user, mode 0700 as the hub wants it.
    runs = " ".join(dockerfile_args("RUN"))
    assert f"-m 700 -o {user} -g {user} {data}" in runs


def test_image_entrypoint_is_a_hub_on_the_exposed_port() -> None:
    argv = hub_command()
    assert argv[0] == "devstream"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "hub"
    host, port = parse_listen(args.listen)
    assert host == "0.0.0.0"
    assert dockerfile_args("EXPOSE") == [str(port)]
    assert args.data is None  # from DEVSTREAM_DATA, the volume
    # Arguments given to `docker run` replace CMD and still parse.
    extra = ["--public-url", "https://hub.example.com", "--max-sas-lifetime", "3600"]
    assert build_parser().parse_args(exec_form(dockerfile_args("ENTRYPOINT")[0])[1:] + extra)


def test_image_healthcheck_asks_for_healthz_on_the_exposed_port() -> None:
    command = healthcheck_command()
    (url,) = re.findall(r"http://[^'\"]+", " ".join(command))
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", url)
    assert match, url
    assert dockerfile_args("EXPOSE") == [match[1]]
    assert isinstance(parse_route(b"GET", match[2].encode()), Health)


async def run_until_healthy(argv: list[str], env: dict[str, str], until: str) -> list[str]:
    """Run *argv* (a hub listening on port 0), wait until it listens, then run the image's
    HEALTHCHECK command against it (its port 8080 replaced by the hub's); return what the hub
    printed up to a line containing *until*."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            _, output = await start_process(nursery, argv, env)
            line = await output.until("devstream hub listening on ")
            port = line.split(";")[0].rsplit(":", 1)[1]
            check = healthcheck_command()
            assert check[0] == "python"
            check = [sys.executable] + [word.replace(":8080/", f":{port}/") for word in check[1:]]
            assert f":{port}/healthz" in " ".join(check)
            result = await trio.run_process(check, check=False, capture_stderr=True)
            assert result.returncode == 0, result.stderr
            await output.until(until)
            lines = list(output.lines)
        nursery.cancel_scope.cancel()
    return lines


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTREAM_")}
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env | extra


def on_port_zero(argv: list[str]) -> list[str]:
    """*argv* with its ``--listen`` on 127.0.0.1, port 0 (another hub may hold 8080)."""
    i = argv.index("--listen")
    return [*argv[: i + 1], "127.0.0.1:0", *argv[i + 2 :]]


async def test_image_command_serves_its_healthcheck(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = child_env(tmp_path, DEVSTREAM_DATA=str(data))
    argv = [sys.executable, "-m", "devstream_trio.cli", *on_port_zero(hub_command())[1:]]
    lines = await run_until_healthy(argv, env, "data folder: ")
    assert f"data folder: {data}" in lines
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


async def test_hub_unit_command_serves_and_its_owner_string_can_be_read_again(
    tmp_path: Path,
) -> None:
    """The unit sends the hub's standard output (the owner connection string, on the first
    start) nowhere; the command its header gives prints the same string."""
    settings = unit_settings(HUB_UNIT)
    unit_env = unit_environment(settings)
    data = tmp_path / "data"
    env = child_env(tmp_path, **(unit_env | {"DEVSTREAM_DATA": str(data)}))
    argv = expand_exec(one(settings, "Service.ExecStart"), unit_env)
    argv = [sys.executable, "-m", "devstream_trio.cli", *on_port_zero(argv)[1:]]
    lines = await run_until_healthy(argv, env, "SharedAccessKey=")
    owner = lines[-1]
    (again,) = re.findall(r"^#\s+sudo -u \S+ devstream (.+)$", HUB_UNIT.read_text(), re.M)
    command = again.split()
    assert command[:3] == ["connection-string", "--data", unit_env["DEVSTREAM_DATA"]]
    command[2] = str(data)
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "devstream_trio.cli", *command],
            env=child_env(tmp_path),
            capture_stdout=True,
            check=False,
        )
    assert result.returncode == 0
    assert result.stdout.decode().strip() == owner
    assert "HostName=localhost:8080" in owner


# -- the licence ------------------------------------------------------------------------------

MIT_GRANT = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    'software and associated documentation files (the "Software"), to deal in the Software '
    "without restriction"
)


def test_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_field = project["license"]
    spdx = license_field["text"] if isinstance(license_field, dict) else license_field
    text = (ROOT / "LICENSE").read_text()
    words = " ".join(text.split())
    assert spdx == "MIT"
    assert text.splitlines()[0] == "MIT License"
    assert re.search(r"^Copyright \(c\) \d{4} \S", text, re.MULTILINE)
    assert MIT_GRANT in words
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in words
