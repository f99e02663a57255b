"""docker-compose.yml and the Dockerfiles, checked statically (no Docker engine is needed).

The file goes through ``docker-compose config -q`` (Debian package ``docker-compose``, installed
by scripts/setup.sh: a missing binary fails the test); every other check reads the files with
pyyaml, so a broken path, an unpinned image, a command naming a module that does not exist or an
environment variable naming no config key fails here rather than at ``docker compose up``.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from models.config import REPO_ROOT, load_config, resolve_path
from models.store import ModelStore
from streaming.settings import StreamingSettings

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
APP_ROOT = PurePosixPath("/app")          # WORKDIR of docker/Dockerfile


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _app_services(services) -> dict:
    return {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "docker/Dockerfile"}


SHELL_SEPARATORS = {";", "||", "&&", "|"}


def _command_words(service: dict) -> list[str]:
    """The command as words; a ``sh -c`` script split into words too, ";" between its lines."""
    command = service.get("command") or []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if words[:2] == ["sh", "-c"] or words[:2] == ["bash", "-c"]:
        script = " ".join(words[2:]).replace("$$", "$").replace(";", " ; ").replace("\n", " ; ")
        words = words[:2] + shlex.split(script)
    return words


def _python_invocations(service: dict) -> list[tuple[str, list[str]]]:
    """(module, its arguments) of every ``python -m module ...`` in the command."""
    words = _command_words(service)
    found = []
    for i in range(len(words) - 2):
        if words[i] in ("python", "python3") and words[i + 1] == "-m":
            rest = words[i + 3:]
            end = next((j for j, w in enumerate(rest) if w in SHELL_SEPARATORS), len(rest))
            found.append((words[i + 2], rest[:end]))
    return found


def _python_modules(service: dict) -> list[str]:
    return [module for module, _ in _python_invocations(service)]


def _module_source(module: str) -> Path | None:
    """The file that parses a module's command line: module.py or package/__main__.py."""
    target = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (target.with_suffix(".py"), target / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _arg_defaults(instructions) -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in instructions if kind == "ARG" and "=" in arg)


def _dockerfiles(services) -> dict[str, Path]:
    return {name: REPO_ROOT / s["build"]["context"] / s["build"].get("dockerfile", "Dockerfile")
            for name, s in services.items() if "build" in s}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a host path or a named volume)."""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def test_compose_file_is_valid(compose):
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not on PATH: scripts/setup.sh installs it (Debian package docker-compose)"
    result = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets", "version"} | {
        key for key in compose if key.startswith("x-")}
    assert {"kafka", "dynamodb", "init", "trainer", "streaming", "replay"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name


def test_every_build_context_and_dockerfile_exists(services):
    dockerfiles = _dockerfiles(services)
    assert dockerfiles, "no service builds an image"
    for name, path in dockerfiles.items():
        assert path.is_file(), f"{name}: {path} does not exist"


def test_every_copied_file_exists_in_its_build_context(services):
    for name, service in services.items():
        if "build" not in service:
            continue
        context = REPO_ROOT / service["build"]["context"]
        for kind, arguments in _dockerfile(_dockerfiles({name: service})[name]):
            if kind in ("COPY", "ADD") and "--from=" not in arguments:
                for source in arguments.split()[:-1]:
                    assert (context / source).exists(), f"{name}: COPY source {source} missing from {context}"


def test_every_mounted_host_path_exists_and_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source in _mounts(service).values():
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: host path {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"


def test_every_image_is_pinned(services):
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert re.fullmatch(r"[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", image), f"{name}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image} floats"
    for path in _dockerfiles(services).values():
        instructions = _dockerfile(path)
        args = _arg_defaults(instructions)
        stages = {a.split()[-1] for kind, a in instructions if kind == "FROM" and " AS " in a.upper()}
        for kind, arguments in instructions:
            if kind != "FROM":
                continue
            base = re.sub(r"\$\{(\w+)\}", lambda m, args=args: args.get(m.group(1), m.group(0)), arguments.split()[0])
            if base in stages:
                continue
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), f"{path}: {base}"


SNAPSHOT_URL = "snapshot.debian.org/archive/"
LOCK_FILE = REPO_ROOT / "requirements-lock.txt"


def _apt_installs(arguments: str) -> list[list[str]]:
    """The packages of every ``apt-get [options] install ...`` in a RUN (one list per install)."""
    installs = []
    for command in re.split(r"&&|\|\||;", arguments):
        words = [w.strip("\"'") for w in command.split()]
        if "apt-get" in words and "install" in words:
            installs.append([w for w in words[words.index("install") + 1:] if not w.startswith("-")])
    return installs


def test_system_and_python_packages_in_the_images_are_pinned_and_stay_installable(services):
    """Debian packages come from the Debian snapshot archive at a fixed date (which keeps every
    version it ever served), never pinned to an exact revision of the live mirror, which drops it at
    the next security update; Python packages come hash-checked from the lock, or pinned."""
    for path in _dockerfiles(services).values():
        instructions = _dockerfile(path)
        args = _arg_defaults(instructions)
        for kind, arguments in instructions:
            if kind != "RUN":
                continue
            for packages in _apt_installs(arguments):
                assert packages, f"{path}: apt-get install of nothing"
                pinned = [p for p in packages if "=" in p]
                assert not pinned, (f"{path}: {pinned} pinned to Debian revisions, which leave the mirror at its "
                                    "next security update: take the versions from a dated snapshot instead")
                assert not [p for p in packages if p.startswith("openjdk")], \
                    f"{path}: the JRE comes from a pinned image, not Debian's openjdk package"
                dates = [args.get(ref, "") for ref in re.findall(r"\$\{?(\w+)\}?", arguments)]
                assert SNAPSHOT_URL in arguments and any(re.fullmatch(r"\d{8}T\d{6}Z", d) for d in dates), (
                    f"{path}: apt must read the Debian snapshot archive ({SNAPSHOT_URL}) at a fixed date "
                    f"(an ARG with a default like 20261201T000000Z) in the RUN that installs {packages}")
                assert "Check-Valid-Until=false" in arguments, f"{path}: snapshot Release files are expired"
            for command in re.split(r"&&|\|\||;", arguments):
                if not re.search(r"\bpip install\b", command):
                    continue
                locked = re.search(r"--require-hashes\b.*-r\s+\S+", command)
                assert locked or "--no-deps" in command or re.search(r"==\$\{\w+\}|==[\d.]+", command), \
                    f"{path}: pip install neither from a lock with hashes, nor --no-deps, nor pinned: {command}"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'"pyspark==[\d.]+"', pyproject), "pyspark must stay pinned in pyproject.toml"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_file_pins_every_dependency_with_hashes():
    import tomllib

    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK_FILE.read_text().split("\n", 2)[2])
    pins = {}
    for entry in (e for e in entries if e.strip() and not e.startswith("#")):
        requirement = entry.split()[0]
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[\w,-]+\])?==[\w.+!-]+", requirement), f"not exact: {requirement}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{requirement} has no hash"
        pins[_normalized(re.split(r"[\[=]", requirement)[0])] = requirement.split("==")[1]
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"],
              *(r for extra in ("dev", "local") for r in project["project"]["optional-dependencies"][extra])]
    for requirement in wanted:
        name = _normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
        assert name in pins, f"{requirement} (pyproject.toml) is not in {LOCK_FILE.name}: run make lock"
    assert re.search(r"^lock:", (REPO_ROOT / "Makefile").read_text(), re.M), "make lock remakes the lock file"
    assert "make lock" in LOCK_FILE.read_text().split("\n", 2)[1]


def test_setup_and_the_app_image_install_the_same_lock_file(services):
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    lock_name = re.search(r"^LOCK=(\S+)$", setup, re.M).group(1)
    assert (REPO_ROOT / lock_name) == LOCK_FILE
    assert re.search(r'pip install -q --require-hashes -r "\$LOCK"', setup)
    assert re.search(r"pip install -q --no-deps --no-build-isolation -e \.", setup)
    assert "$LOCK" in re.search(r"^py_key=.*$", setup, re.M).group(0), "a changed lock re-installs"

    path = _dockerfiles(services)["streaming"]
    instructions = _dockerfile(path)
    copied = [a.split()[:-1] for kind, a in instructions if kind == "COPY" and not a.startswith("--from=")]
    assert [lock_name] in copied, f"{path} does not copy {lock_name}"
    runs = [a for kind, a in instructions if kind == "RUN"]
    assert any(re.search(rf"pip install --require-hashes -r {re.escape(lock_name)}\b", r) for r in runs)
    assert any(re.search(r"pip install --no-deps --no-build-isolation -e \.", r) for r in runs)
    assert not any(re.search(r"pip install (?!--require-hashes -r |--no-deps )", r) for r in runs), \
        "every Python package of the app image comes from the lock"

    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    for sources in copied:
        for source in sources:
            assert f"!{source}" in ignore, f"{path.name}.dockerignore keeps {source} out of the build context"


def test_the_app_image_runs_spark_on_the_jre_of_a_pinned_image(services):
    path = _dockerfiles(services)["streaming"]
    instructions = _dockerfile(path)
    args = _arg_defaults(instructions)
    stages = {a.split()[-1]: re.sub(r"\$\{(\w+)\}", lambda m, args=args: args.get(m.group(1), m.group(0)), a.split()[0])
              for kind, a in instructions if kind == "FROM" and " AS " in a.upper()}
    java_home = re.search(r"JAVA_HOME=(\S+)", " ".join(a for kind, a in instructions if kind == "ENV")).group(1)
    copies = [a.split() for kind, a in instructions if kind == "COPY" and a.startswith("--from=")]
    jre = next((c for c in copies if c[-1].rstrip("/") == java_home), None)
    assert jre, f"JAVA_HOME {java_home} is not copied from another image"
    image = stages[jre[0].split("=", 1)[1]]
    assert re.fullmatch(r"eclipse-temurin:17\.[\d.]+_\d+-jre(-\w+)?", image), \
        f"the JRE image {image} is not one release"


def test_python_module_commands_name_existing_modules(services):
    seen = []
    for name, service in services.items():
        for module in _python_modules(service):
            seen.append(module)
            parts = module.split(".")
            for depth in range(1, len(parts)):
                package = REPO_ROOT.joinpath(*parts[:depth])
                assert (package / "__init__.py").is_file(), f"{name}: python -m {module}: {package} is no package"
            target = REPO_ROOT.joinpath(*parts)
            if (target / "__init__.py").is_file():
                assert (target / "__main__.py").is_file(), f"{name}: python -m {module}: no __main__.py"
            else:
                assert target.with_suffix(".py").is_file(), f"{name}: python -m {module}: no such module"
    assert {"infra", "batch_training", "streaming", "tools.replay"} <= set(seen)


def test_command_options_are_declared_by_the_modules_they_are_passed_to(services):
    checked = 0
    for name, service in services.items():
        for module, arguments in _python_invocations(service):
            source = _module_source(module)
            assert source is not None, f"{name}: python -m {module}: no module file"
            text = source.read_text()
            for option in (a.split("=")[0] for a in arguments if a.startswith("--")):
                assert f'"{option}"' in text, f"{name}: python -m {module} does not declare {option}"
                checked += 1
    assert checked >= 3


def test_depends_on_names_defined_services_and_orders_the_start(services):
    conditions = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for other, spec in depends.items():
            assert other in services and other != name, f"{name} depends on unknown service {other}"
            conditions[(name, other)] = spec.get("condition")
    assert conditions[("init", "kafka")] == conditions[("init", "dynamodb")] == "service_healthy"
    assert conditions[("trainer", "init")] == "service_completed_successfully"
    assert conditions[("streaming", "trainer")] == "service_completed_successfully"
    assert ("replay", "streaming") in conditions


def test_kafka_and_dynamodb_have_health_checks(services):
    kafka_check = services["kafka"]["healthcheck"]["test"]
    assert kafka_check[1:] == ["/opt/kafka/bin/kafka-topics.sh", "--bootstrap-server", "localhost:9092", "--list"]
    dynamodb_check = " ".join(services["dynamodb"]["healthcheck"]["test"])
    port = _dynamodb_port(services)
    assert f"127.0.0.1:{port}" in dynamodb_check or f"localhost:{port}" in dynamodb_check
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", services["kafka"]["image"])


def _dynamodb_port(services) -> str:
    words = _command_words(services["dynamodb"])
    return words[words.index("-p") + 1]


def test_app_environment_points_at_the_compose_services(services):
    kafka_env = _env(services["kafka"])
    for name, service in _app_services(services).items():
        env = _env(service)
        host, port = env["RECO__KAFKA__BOOTSTRAP_SERVERS"].split(":")
        assert host == "kafka" and f"://{host}:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"], name
        assert f"://:{port}" in kafka_env["KAFKA_LISTENERS"], name
        endpoint = urlparse(env["RECO__DYNAMODB__ENDPOINT_URL"])
        assert (endpoint.hostname, str(endpoint.port)) == ("dynamodb", _dynamodb_port(services)), name


def test_every_environment_override_names_a_config_key(services):
    for name, service in _app_services(services).items():
        env = _env(service)
        files = [f for f in env.get("RECO_CONFIG", "").split(",") if f]
        for file in files:
            assert (REPO_ROOT / file).is_file(), f"{name}: RECO_CONFIG file {file} does not exist"
        cfg = load_config(files=[REPO_ROOT / f for f in files], env={})
        for variable in env:
            if variable.startswith("RECO__"):
                dotted = variable[len("RECO__"):].lower().replace("__", ".")
                assert cfg.get_path(dotted, None) is not None, f"{name}: {variable} names no config key"


def test_volumes_hold_what_the_jobs_keep(services):
    for name, service in _app_services(services).items():
        mounts, env = _mounts(service), _env(service)
        cfg = load_config(files=[REPO_ROOT / f for f in env.get("RECO_CONFIG", "").split(",") if f], env=env)
        assert mounts[str(APP_ROOT / "config")].rstrip("/") == "./config", name
        # Resolved by the product's own code, then moved from this checkout to the image's /app.
        kept = {"models": _in_container(ModelStore.from_config(cfg).backend.root),
                "checkpoints": _in_container(StreamingSettings.from_config(cfg).checkpoint_dir)}
        if cfg.get_path("data.path", None):
            kept["data"] = _in_container(resolve_path(cfg.text("data.path")))
        for volume, path in kept.items():
            assert any(source == volume and (path == PurePosixPath(target) or PurePosixPath(target) in path.parents)
                       for target, source in mounts.items()), f"{name}: {path} is not on the {volume} volume"
    replay_file = APP_ROOT / _command_words(services["replay"])[3]
    assert PurePosixPath(_mount_target(services["replay"], "data")) in replay_file.parents


def _in_container(path) -> PurePosixPath:
    """A path the product resolved under this checkout, as the container sees it (under /app)."""
    return APP_ROOT / PurePosixPath(Path(path).relative_to(REPO_ROOT).as_posix())


def _mount_target(service: dict, volume: str) -> str:
    return next(target for target, source in _mounts(service).items() if source == volume)


def test_app_image_runs_as_a_user_with_spark_python_and_the_pinned_jars(services):
    instructions = _dockerfile(_dockerfiles(services)["streaming"])
    users = [a for kind, a in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env_text = " ".join(a for kind, a in instructions if kind == "ENV")
    assert "PYSPARK_PYTHON=" in env_text
    assert [a for kind, a in instructions if kind == "WORKDIR"][-1] == str(APP_ROOT)

    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    maven_step = re.search(r"^\s*(mvn .*generate-resources)\s*$", setup, re.M).group(1)
    runs = " ".join(a for kind, a in instructions if kind == "RUN")
    assert maven_step in runs, f"the image must copy the jars like scripts/setup.sh: {maven_step}"
    jars_dir = APP_ROOT / str(load_config(files=[], env={}).get_path("spark.jars_dir"))
    copies = [a.split() for kind, a in instructions if kind == "COPY" and a.startswith("--from=")]
    assert any(PurePosixPath(APP_ROOT / c[-1].rstrip("/")) == jars_dir and ".cache/jars/spark" in c[-2]
               for c in copies), f"connector jars must land in {jars_dir}"


def test_app_image_copies_every_package_of_the_project(services):
    include = re.search(r"^include\s*=\s*\[(.*?)\]", (REPO_ROOT / "pyproject.toml").read_text(), re.M | re.S)
    packages = {pattern.rstrip("*") for pattern in re.findall(r'"([^"]+)"', include.group(1))}
    copied = {a.split()[0].rstrip("/") for kind, a in _dockerfile(_dockerfiles(services)["streaming"])
              if kind == "COPY" and not a.startswith("--from=")}
    assert packages and packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def test_the_streaming_service_is_health_checked_and_scraped(services):
    """The healthcheck calls the driver's /healthz, and Prometheus scrapes its /metrics, both on
    the configured port; the endpoint listens beyond the container's loopback."""
    port = load_config(files=[], env={}).get_path("streaming.metrics.port")
    streaming = services["streaming"]
    assert _env(streaming)["RECO__STREAMING__METRICS__HOST"] == "0.0.0.0"
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(streaming["healthcheck"]["test"])
    assert any(p.endswith(f":{port}") for p in streaming["ports"])
    mounts = _mounts(services["prometheus"])
    prometheus = yaml.safe_load((REPO_ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"streaming:{port}" in targets
