"""docker-compose.yml and workers/Dockerfile, checked against the CLI and the environment contract.

No Docker engine runs here, so the compose file is parsed: every command a
service (or its healthcheck) runs must be accepted by the real ``tokencache``
argument parser or name a module that is in the image, every ``TOKENCACHE_*``,
``GOOGLE_*`` and ``GCE_*`` variable must be one docs/design.md defines, and the
services must be wired the way the README says (a scalable worker pool that
alone holds credentials, an app that holds none).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tokencache import env
from tokencache.cli import commands as cli
from tokencache.testing.redisserver import free_port

from .conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = ROOT / "workers" / "Dockerfile"

CONTRACT_PREFIXES = ("TOKENCACHE_", "GOOGLE_", "GCE_")
CONTRACT_VARIABLES = {
    value
    for name, value in vars(env).items()
    if name.isupper() and isinstance(value, str) and value.startswith(CONTRACT_PREFIXES)
} | {"GCE_METADATA_HOST", "GCE_METADATA_IP"}
CREDENTIAL_VARIABLES = {
    env.CREDENTIALS,
    env.GOOGLE_APPLICATION_CREDENTIALS,
    "GCE_METADATA_HOST",
    "GCE_METADATA_IP",
}
SHARED = (env.REDIS_URL, env.NAMESPACE, env.QUEUE, env.REFRESH_BEFORE)
DEFAULTS = {
    env.REDIS_URL: env.DEFAULT_REDIS_URL,
    env.NAMESPACE: env.DEFAULT_NAMESPACE,
    env.QUEUE: env.DEFAULT_QUEUE,
    env.REFRESH_BEFORE: str(env.DEFAULT_REFRESH_BEFORE),
}
KNOWN_PROGRAMS = {"tokencache", "python", "redis-server", "redis-cli"}


# -- reading the files ------------------------------------------------------------------


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume the service mounts, short or long syntax."""
    found = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found.append((volume.get("source", ""), volume["target"]))
        else:
            parts = volume.split(":")
            found.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return found


def argv_of(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def commands(service: dict[str, Any]) -> Iterator[list[str]]:
    """The command and the healthcheck command of a service, as argv lists."""
    for key in ("entrypoint", "command"):
        if key in service:
            yield argv_of(service[key])
    test = (service.get("healthcheck") or {}).get("test")
    if test:
        test = argv_of(test)
        yield shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:] if test[0] == "CMD" else test


def parse(argv: list[str]) -> Any:
    """``tokencache ARGV`` through the real argument parser; a rejected command fails the test."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli._parser().parse_args(argv)
    except SystemExit:
        pass
    pytest.fail(f"tokencache rejects {argv}: {stderr.getvalue().strip()}", pytrace=False)


def tokencache_args(name: str) -> Any:
    argv = argv_of(SERVICES[name]["command"])
    assert argv[0] == "tokencache", f"{name} does not run tokencache: {argv}"
    return parse(argv[1:])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of workers/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def copy_sources() -> list[str]:
    sources = []
    for instruction, rest in dockerfile():
        if instruction in ("COPY", "ADD"):
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue  # from another build stage, not the repository
            sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


def build_services() -> list[str]:
    return sorted(name for name, service in SERVICES.items() if "build" in service)


# -- the services and their commands ----------------------------------------------------


def test_services_are_redis_emulator_worker_and_app() -> None:
    assert set(SERVICES) == {"redis", "emulator", "worker", "app"}
    assert not COMPOSE.get("version"), "the compose spec has no version field any more"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_is_one_the_image_can_run(name: str) -> None:
    service = SERVICES[name]
    for argv in commands(service):
        program = argv[0]
        assert program in KNOWN_PROGRAMS, f"{name} runs {program!r}, which this test cannot check"
        if program == "tokencache":
            parse(argv[1:])
        elif program == "python":
            check_python(name, argv)
        else:
            assert service.get("image", "").startswith("redis:"), f"{name} runs {program} without Redis"


def check_python(name: str, argv: list[str]) -> None:
    """``python -m MODULE`` must be a module of the image; ``python -c CODE`` must compile."""
    assert "build" in SERVICES[name], f"{name} runs python outside the tokencache image"
    flag, value = argv[1], argv[2]
    if flag == "-c":
        compile(value, f"<{name} healthcheck>", "exec")
        return
    assert flag == "-m", f"{name}: python {flag} is neither -m nor -c"
    path = Path(*value.split("."))
    assert (ROOT / path.with_suffix(".py")).is_file() or (ROOT / path / "__main__.py").is_file(), value
    assert path.parts[0] in copy_sources() or value.startswith("tokencache"), (
        f"{value} is not copied into the image by workers/Dockerfile"
    )


def test_dockerfile_cmd_is_a_tokencache_command() -> None:
    (cmd,) = [json.loads(rest) for instruction, rest in dockerfile() if instruction == "CMD"]
    assert cmd[0] == "tokencache"
    parse(cmd[1:])


def test_redis_is_redis7_with_appendonly() -> None:
    redis = SERVICES["redis"]
    assert redis["image"] in ("redis:7", "redis:7-alpine") or redis["image"].startswith("redis:7.")
    argv = argv_of(redis["command"])
    assert argv[0] == "redis-server" and argv[argv.index("--appendonly") + 1] == "yes"


def test_worker_runs_the_pool_and_is_scalable() -> None:
    worker = SERVICES["worker"]
    args = tokencache_args("worker")
    assert args.command == "worker" and args.workers >= 1 and not args.burst
    # `docker compose up --scale worker=3` refuses a fixed container name or host port.
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"worker sets {key}: it could not be scaled"


# -- environment ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_variables_are_the_contracts(name: str) -> None:
    service = SERVICES[name]
    assert "env_file" not in service, "every variable must be visible here, where it is checked"
    for variable in environment(service):
        if variable.startswith(CONTRACT_PREFIXES):
            assert variable in CONTRACT_VARIABLES, (
                f"{name} sets {variable}, which docs/design.md does not define"
            )


@pytest.mark.parametrize("name", ["worker", "app"])
def test_redis_url_points_at_the_redis_service(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = environment(SERVICES[name])[env.REDIS_URL]
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.hostname == "redis" and (parts.port or 6379) == 6379, url
    for variable, value in environment(SERVICES[name]).items():
        monkeypatch.setenv(variable, value)
    assert env.redis_url() == url and env.refresh_before() >= 0  # the values parse as the contract says


def test_workers_and_app_share_redis_namespace_and_queue() -> None:
    """An app on another namespace or queue would wait forever for a token nobody refreshes."""
    worker, app = environment(SERVICES["worker"]), environment(SERVICES["app"])
    for variable in SHARED:
        assert worker.get(variable, DEFAULTS[variable]) == app.get(variable, DEFAULTS[variable]), variable


def test_worker_credentials_come_from_the_emulators_keys() -> None:
    worker = environment(SERVICES["worker"])
    emulator = tokencache_args("emulator")
    keys_volume = volume_at(SERVICES["emulator"], emulator.keys)
    worker_keys = dict((target, source) for source, target in mounts(SERVICES["worker"]))
    paths = [*worker[env.CREDENTIALS].split(":"), worker.get(env.GOOGLE_APPLICATION_CREDENTIALS, "")]
    for path in filter(None, paths):
        mount = next((t for t in worker_keys if path == t or path.startswith(t.rstrip("/") + "/")), None)
        assert mount is not None and worker_keys[mount] == keys_volume, f"worker reads {path} from no keys"
    default = worker.get(env.GOOGLE_APPLICATION_CREDENTIALS)
    if default:
        assert re.fullmatch(r"sa-(\d+)\.json", Path(default).name), "the emulator writes sa-N.json"
        assert int(Path(default).name[3:-5]) <= emulator.accounts


def volume_at(service: dict[str, Any], target: str) -> str:
    return next(source for source, t in mounts(service) if t == target)


def test_app_holds_no_credentials() -> None:
    app = SERVICES["app"]
    assert not CREDENTIAL_VARIABLES & set(environment(app)), "the app must rely on the workers"
    keys = volume_at(SERVICES["emulator"], tokencache_args("emulator").keys)
    assert keys not in [source for source, _ in mounts(app)], "the app must not see the key files"
    assert app.get("user") is None, "the app runs as the image's unprivileged user"


def test_app_publishes_its_one_port_and_calls_the_emulator() -> None:
    app = environment(SERVICES["app"])
    (published,) = SERVICES["app"]["ports"]
    assert str(published).rsplit(":", 1)[-1] == app.get("APP_PORT", "8080")
    emulator = tokencache_args("emulator")
    api = urlsplit(app["APP_API_URL"])
    assert (api.hostname, api.port, api.path) == ("emulator", emulator.port, "/tokeninfo")


def test_emulator_key_files_name_the_emulator_service() -> None:
    args = tokencache_args("emulator")
    assert args.host == "0.0.0.0", "listen on every interface, or other containers cannot reach it"
    public = urlsplit(args.public_url)
    assert (public.scheme, public.hostname, public.port) == ("http", "emulator", args.port)


@pytest.mark.parametrize("name", ["emulator", "app"])
def test_healthchecks_probe_the_port_the_service_listens_on(name: str) -> None:
    port = tokencache_args(name).port if name == "emulator" else int(environment(SERVICES[name])["APP_PORT"])
    (*_, code) = argv_of(SERVICES[name]["healthcheck"]["test"])
    urls = re.findall(r"https?://[^'\"\s]+", code)
    assert urls and all(urlsplit(u).port == port for u in urls), urls


# -- volumes, dependencies, the image ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_volumes_referenced_exist(name: str) -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for source, target in mounts(SERVICES[name]):
        assert target.startswith("/"), f"{name} mounts at a relative path {target}"
        if source.startswith((".", "/", "~")):
            assert (ROOT / source).exists(), f"{name} bind-mounts {source}, which is not in the repository"
        elif source:
            assert source in declared, f"{name} mounts volume {source!r}, not declared under volumes:"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_existing_services_that_can_be_healthy(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    for other in depends:
        assert other in SERVICES, f"{name} depends on {other}, which is not a service"
        condition = depends[other].get("condition") if isinstance(depends, dict) else None
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[other], (
                f"{name} waits for {other} to be healthy; it has no check"
            )


def test_services_sharing_the_keys_run_as_one_user() -> None:
    """The emulator writes key files readable by their owner only (0600); the workers must read them."""
    keys = volume_at(SERVICES["emulator"], tokencache_args("emulator").keys)
    users = {SERVICES[n].get("user") for n in SERVICES if keys in [s for s, _ in mounts(SERVICES[n])]}
    assert len(users) == 1, f"services sharing {keys!r} run as different users: {users}"


@pytest.mark.parametrize("name", build_services())
def test_build_names_the_repository_and_the_dockerfile(name: str) -> None:
    build = SERVICES[name]["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    assert context.resolve() == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_dockerfile_copy_sources_exist() -> None:
    sources = copy_sources()
    assert sources
    for source in sources:
        assert list(ROOT.glob(source)), f"workers/Dockerfile copies {source}, which is not in the repository"


def test_dockerfile_installs_the_package_with_its_dependencies() -> None:
    steps = dockerfile()
    runs = [rest for instruction, rest in steps if instruction == "RUN"]
    assert any(re.search(r"\bpip install\b(?!.*--no-deps).* \.(\s|$)", r + " ") for r in runs), runs
    copied = copy_sources()
    for needed in ("pyproject.toml", "README.md", "tokencache", "workers", "examples"):
        assert needed in copied, f"workers/Dockerfile does not copy {needed}"
    user = [rest for instruction, rest in steps if instruction == "USER"]
    assert user and user[-1] not in ("root", "0"), "the services should not run as root"


# -- the emulator command, run -----------------------------------------------------------


def test_emulator_command_writes_key_files_naming_its_public_url(tmp_path: Path) -> None:
    """Run compose's emulator command (on a free local port) and read the key file the workers get."""
    argv = argv_of(SERVICES["emulator"]["command"])
    args = tokencache_args("emulator")
    local = {"--host": "127.0.0.1", "--port": str(free_port()), "--keys": str(tmp_path / "keys")}
    argv = [local.get(prev, arg) for prev, arg in zip(["", *argv], argv, strict=False)]
    out = tmp_path / "emulator.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=stdout, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "listening" in out.read_text() or proc.poll() is not None, 15, what="emulator")
        finally:
            proc.terminate()
            proc.wait(10)
    key = json.loads((tmp_path / "keys" / "sa-1.json").read_text())
    assert key["token_uri"] == args.public_url.rstrip("/") + "/token", out.read_text()
