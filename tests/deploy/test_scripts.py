"""The shell scripts around the container set-up, without an engine: .ci/run and deploy/local-engine.sh.

- both parse and are ShellCheck-clean;
- .ci/run stops with an error when apt cannot install what the tests need, and never runs the tests
  then (apt-get and make are fakes on a PATH of their own here);
- deploy/local-engine.sh answers a usage error with 2 and says why no engine can run without root
  (status 3, which the engine tests turn into a skip, or a failure under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.deploy.common import REPO_ROOT
from tests.requires import unavailable

CI_RUN = REPO_ROOT / ".ci" / "run"
ENGINE = REPO_ROOT / "deploy" / "local-engine.sh"
SCRIPTS = [CI_RUN, ENGINE]
BASH = shutil.which("bash") or "/bin/bash"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script: Path) -> None:
    parsed = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck not installed (Debian: apt-get install shellcheck; .ci/run installs it)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def fake_path(tmp_path: Path, apt_script: str) -> dict[str, str]:
    """A PATH with a scripted apt-get, a make that only records that it ran, and the few real tools
    .ci/run needs; none of the packages it checks for, so it always wants to install them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "dirname", "chmod", "rm"):
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    (bin_dir / "apt-get").write_text(f"#!{BASH}\necho \"apt-get $*\" >>'{tmp_path}/apt.log'\n{apt_script}\n")
    (bin_dir / "make").write_text(f"#!{BASH}\necho \"make $*\" >'{tmp_path}/make.log'\n")
    for fake in ("apt-get", "make"):
        (bin_dir / fake).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "BASH_ENV", "ENV")}
    return {**env, "PATH": str(bin_dir), "CI": "true"}


@pytest.mark.parametrize(
    ("apt_script", "message"),
    [
        ("exit 100", "apt-get update failed"),
        ('[ "$1" = update ] && exit 0; exit 100', "could not install"),
    ],
    ids=["update-fails", "install-fails"],
)
def test_ci_run_fails_when_apt_fails(tmp_path: Path, apt_script: str, message: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(".ci/run installs packages only as root (CI runs it as root)")
    policy = Path("/usr/sbin/policy-rc.d")
    policy_before = policy.read_bytes() if policy.exists() else None
    result = subprocess.run(
        [BASH, str(CI_RUN)], env=fake_path(tmp_path, apt_script), capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and message in result.stderr, result.stdout + result.stderr
    assert "docker.io" in result.stderr and "debootstrap" in result.stderr
    assert not (tmp_path / "make.log").exists(), "the tests ran after a failed install"
    assert (policy.read_bytes() if policy.exists() else None) == policy_before


def test_ci_run_installs_then_runs_the_tests(tmp_path: Path) -> None:
    """The same fakes with an apt-get that succeeds: installs everything, with no recommends, then tests."""
    if os.geteuid() != 0:
        pytest.skip(".ci/run installs packages only as root (CI runs it as root)")
    result = subprocess.run(
        [BASH, str(CI_RUN)], env=fake_path(tmp_path, "exit 0"), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    install = (tmp_path / "apt.log").read_text().splitlines()[-1]
    assert install.startswith("apt-get install -y -qq --no-install-recommends")
    assert set(install.split()[5:]) == {"chromium", "prometheus", "docker.io", "debootstrap", "shellcheck"}
    assert (tmp_path / "make.log").read_text().strip() == "make test"


def test_local_engine_usage_error() -> None:
    result = subprocess.run([BASH, str(ENGINE), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "local-engine.sh start" in result.stderr


def test_local_engine_says_why_it_cannot_run_without_root() -> None:
    command = [BASH, str(ENGINE), "check"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) not installed: cannot drop root to try")
        # A copy that user nobody can read wherever the checkout lives (/root is not readable to it).
        folder = Path(tempfile.mkdtemp(prefix="dclgan-engine-check."))
        folder.chmod(0o755)
        copy = folder / ENGINE.name
        shutil.copyfile(ENGINE, copy)
        copy.chmod(0o755)
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", BASH, str(copy), "check"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/")
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(folder)
    assert result.returncode == 3, result.stderr
    assert "unavailable: dockerd needs root" in result.stderr
