"""The README against the code: the configuration tables name exactly the ``DCLGAN_*`` variables the code
reads, user-facing docs name no development-only path, the Python API example runs, and the app reports the
package's version."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
NAME = re.compile(r"\bDCLGAN_[A-Z0-9_]*[A-Z0-9]")
# Where variables are read: the service's settings (pydantic reads DCLGAN_<FIELD>), any name spelled out in
# the Python packages, and the container files (the image's ENV, compose's ${...} substitutions).
READERS = ("service/**/*.py", "training/**/*.py", "Dockerfile", "docker-compose*.yml")
USER_DOCS = ("README.md", "models/**/README.md", "docs/*.md", "deploy/README.md")


def names_in_code() -> set[str]:
    names = {f"DCLGAN_{field.upper()}" for field in Settings.model_fields}
    for pattern in READERS:
        for path in REPO.glob(pattern):
            names |= set(NAME.findall(path.read_text()))
    return names


def names_in_readme_tables(text: str) -> set[str]:
    """The first cell of every table row that is a ``DCLGAN_*`` name: the configuration tables."""
    return set(re.findall(r"^\| `(DCLGAN_[A-Z0-9_]+)` \|", text, re.MULTILINE))


def test_readme_configuration_tables_match_the_code_both_ways() -> None:
    code, documented = names_in_code(), names_in_readme_tables(README)
    assert not code - documented, f"read by the code but missing from the README's tables: {sorted(code - documented)}"
    assert not documented - code, f"in the README's tables but read by no code: {sorted(documented - code)}"


def test_the_table_check_sees_compose_only_variables() -> None:
    """DCLGAN_HTTP_PORT is read by compose only: the check must find it there, not just in Settings."""
    assert "DCLGAN_HTTP_PORT" not in {f"DCLGAN_{f.upper()}" for f in Settings.model_fields}
    assert "DCLGAN_HTTP_PORT" in names_in_code()


@pytest.mark.parametrize("pattern", USER_DOCS)
def test_user_docs_name_no_development_only_path(pattern: str) -> None:
    for path in REPO.glob(pattern):
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if "../shared" in line]
        assert not hits, f"{path.relative_to(REPO)} lines {hits} name ../shared, which exists only in development"


def python_example(text: str) -> str:
    """The README's httpx example (the one ```python block that posts to /translate)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "/translate/" in b]
    assert len(blocks) == 1, "expected one Python API example in the README"
    return blocks[0]


def test_readme_python_example_translates_with_the_bundled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs the example as written, its httpx.Client swapped for a client of the real app in process."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    app = create_app(Settings(models_dir=REPO / "models"))

    def client(base_url: str, **_: Any) -> httpx.Client:
        return TestClient(app, base_url=base_url)

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (72, 40), (120, 90, 60)).save("horse.jpg")
    monkeypatch.setattr(httpx, "Client", client)
    exec(compile(python_example(README), "README example", "exec"), {})
    with Image.open(tmp_path / "zebra.png") as out:
        assert out.size == (72, 40)


def test_installing_table_names_every_extra_and_only_real_ones() -> None:
    """The extras of pyproject.toml against the ``.[a,b]`` installs the README's Installing section gives."""
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    section = README[README.index("## Installing") : README.index("## The service")]
    named = {extra for group in re.findall(r"\.\[([a-z0-9,-]+)\]", section) for extra in group.split(",")}
    assert not named - declared, f"the README installs extras pyproject.toml lacks: {sorted(named - declared)}"
    assert not declared - named - {"dev"}, f"extras the README never mentions: {sorted(declared - named - {'dev'})}"


def test_app_reports_the_package_version() -> None:
    from service.main import create_app

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("dclgan-serve") == declared
    assert create_app(Settings(models_dir=REPO / "models")).version == declared
