"""The container files: docker-compose.yml's structure, and `docker-compose config` on it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dask
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = ("scheduler", "worker", "gpu-worker", "runner", "nightly")
SHARED_MOUNTS = ("worker", "gpu-worker", "runner", "nightly")


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host ip or None, published, target) for each port, short or long syntax."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip"), str(port.get("published")), str(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 3:
            ports.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            ports.append((None, parts[0], parts[1]))
        else:
            ports.append((None, parts[0], parts[0]))
    return ports


def _mount_targets(service: dict) -> set[str]:
    targets = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.add(volume["target"])
            continue
        # "${SEAMLINE_DATA:-./data}:/data:ro": the variable's default holds a colon too.
        parts = re.sub(r"\$\{[^}]*\}", "SOURCE", str(volume)).split(":")
        targets.add(parts[1] if len(parts) > 1 else parts[0])
    return targets


def test_compose_structure() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in SERVICES:
        assert name in services, f"service {name} missing"

    # Scheduler and dashboard, published on loopback only.
    scheduler = services["scheduler"]
    ports = _ports(scheduler)
    published = {target: (ip, host_port) for ip, host_port, target in ports}
    assert "8786" in published and "8787" in published, ports
    for ip, host_port, target in ports:
        assert ip == "127.0.0.1", f"port {host_port}:{target} is not bound to loopback"
    assert "healthcheck" in scheduler
    assert "dask scheduler" in _command(scheduler)

    # The GPU worker advertises the resource and reserves an NVIDIA device.
    gpu = services["gpu-worker"]
    assert "--resources GPU=1" in _command(gpu)
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert "gpu" in gpu.get("profiles", [])

    # The CPU worker is scalable.
    worker = services["worker"]
    assert "container_name" not in worker
    assert "dask worker tcp://scheduler:8786" in _command(worker)

    # Workers are not daemonic (Dask reads the variable as its config), so each may start its side process;
    # Dask's profiler is off.
    for name in ("worker", "gpu-worker"):
        config = dask.config.collect_env(services[name].get("environment", {}))
        assert config.get("distributed", {}).get("worker", {}).get("daemon") is False, name
        assert config["distributed"]["worker"].get("profile", {}).get("enabled") is False, name  # as seamline run's workers

    # The runner submits to the compose scheduler.
    runner = services["runner"]
    command = _command(runner)
    assert "seamline run" in command
    assert "--scheduler tcp://scheduler:8786" in command
    assert '--model "$$SEAMLINE_MODEL"' in command and "SEAMLINE_MODEL" in runner["environment"]  # never silently the demo model
    assert "run" in runner.get("profiles", [])

    # Workers read images and write outputs themselves: the same paths everywhere.
    mounts = {name: _mount_targets(services[name]) for name in SHARED_MOUNTS}
    for name, targets in mounts.items():
        assert {"/data", "/out"} <= targets, f"{name} mounts {targets}"
    assert len({frozenset(t) for t in mounts.values()}) == 1, mounts

    # Every build uses the Dockerfile in the repository root.
    builders = [name for name, service in services.items() if "build" in service]
    assert builders, "no service builds the image"
    for name in builders:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        path = ((ROOT / context) / dockerfile).resolve()
        assert path == DOCKERFILE.resolve(), f"{name} builds {path}"
        assert path.is_file()

    dockerfile_text = DOCKERFILE.read_text()
    assert re.search(r"^\s*(RUN\s+.*)?pip install\b.*\s\.(\s|$)", dockerfile_text, re.MULTILINE), "Dockerfile does not pip install the project"
    assert "http" not in dockerfile_text.lower()


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian package) not installed; .ci/run installs it",
)
@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu", "--profile", "run"]], ids=["default", "gpu+run"])
def test_docker_compose_config_validates(profiles: list[str]) -> None:
    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", *profiles, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        print(result.stderr)
    assert result.returncode == 0, result.stderr


def test_nightly_runner_runs_a_shipped_workflow_on_the_cluster():
    from workflows.spec import load_workflow

    nightly = yaml.safe_load(COMPOSE.read_text())["services"]["nightly"]
    command = _command(nightly)
    assert "seamline run" in command and "--scheduler tcp://scheduler:8786" in command
    assert "|| true" not in command and "failed with exit code" in command  # a failed night shows in the log
    default = nightly["environment"]["SEAMLINE_WORKFLOW"].split(":-")[1].rstrip("}")
    assert default.startswith("/app/workflows/")
    for name in ("satellite-archive.yaml", "slide-archive.yaml"):
        workflow = load_workflow(ROOT / "workflows" / name)  # the shipped examples validate
        assert str(workflow.outputs.dir).startswith("/out") and all(str(p).startswith("/data") for p in workflow.inputs.roots)
    assert (ROOT / default.replace("/app/", "")).is_file()
