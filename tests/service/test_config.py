"""Settings: defaults, DCLGAN_* parsing, validation, and reading the environment only when asked."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import service.config
from service.config import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DCLGAN_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()


def test_defaults_match_the_documented_table() -> None:
    s = Settings()
    assert (s.models_dir, s.host, s.port, s.devices) == (Path("models"), "127.0.0.1", 8000, ["cpu"])
    assert (s.max_queue_delay_ms, s.queue_full_status, s.max_upload_bytes) == (0.0, 503, 10 * 1024 * 1024)
    assert (s.api_keys, s.cors_origins, s.metrics_require_auth) == ([], [], False)
    assert s.require_gpu and s.log_level == "info" and s.max_queue_delay_s == 0.0


def test_environment_variables_with_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCLGAN_DEVICES", "cuda:0, cuda:1")
    monkeypatch.setenv("DCLGAN_API_KEYS", "k1,k2")
    monkeypatch.setenv("DCLGAN_CORS_ORIGINS", "https://a.example")
    monkeypatch.setenv("DCLGAN_MAX_QUEUE_DELAY_MS", "2.5")
    monkeypatch.setenv("DCLGAN_QUEUE_FULL_STATUS", "429")
    monkeypatch.setenv("DCLGAN_MODELS_DIR", "/srv/models")
    s = Settings()
    assert s.devices == ["cuda:0", "cuda:1"]
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(s)  # keys never end up in logs
    assert s.cors_origins == ["https://a.example"]
    assert (
        s.max_queue_delay_s == 0.0025 and s.queue_full_status == 429 and s.models_dir == Path("/srv/models")
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("devices", "gpu"),
        ("devices", "cpu,cpu"),
        ("queue_full_status", "500"),
        ("max_batch_size", "0"),
        ("port", "70000"),
        ("log_level", "loud"),
    ],
)
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, field: str, value: str) -> None:
    monkeypatch.setenv(f"DCLGAN_{field.upper()}", value)
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_get_settings_reads_the_environment_on_first_call_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    importlib.reload(service.config)  # importing reads nothing ...
    monkeypatch.setenv("DCLGAN_PORT", "9001")
    first = service.config.get_settings()  # ... the first call does
    monkeypatch.setenv("DCLGAN_PORT", "9002")
    assert first.port == 9001 and service.config.get_settings() is first
    service.config.get_settings.cache_clear()
    assert service.config.get_settings().port == 9002


def test_settings_are_immutable() -> None:
    with pytest.raises(ValidationError):
        Settings().port = 1  # type: ignore[misc]


def test_every_setting_is_documented() -> None:
    """The field descriptions are the README's configuration table."""
    assert all(field.description for field in Settings.model_fields.values())


@pytest.mark.parametrize("keys", [" , ", "k1,", ",k1", "k1, ,k2"])
def test_a_blank_api_key_is_refused_not_turned_into_no_authentication(
    monkeypatch: pytest.MonkeyPatch, keys: str
) -> None:
    monkeypatch.setenv("DCLGAN_API_KEYS", keys)
    with pytest.raises(ValidationError, match="empty item"):
        Settings()


def test_the_batch_size_defaults_to_what_measured_best_on_each_device_kind() -> None:
    assert Settings().max_batch_size == 1
    assert Settings(devices=["cpu"]).max_batch_size == 1
    assert Settings(devices="cuda:0,cuda:1").max_batch_size == 8
    assert Settings(devices=["cuda:0"], max_batch_size=3).max_batch_size == 3


def test_instances_default_to_what_measured_best_on_each_device_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two per direction on a CPU of at most 2 usable cores, one on larger CPUs and on GPUs."""
    for cores, instances in ((1, 2), (2, 2), (3, 1), (16, 1)):
        monkeypatch.setattr(service.config, "default_threads", lambda cores=cores: cores)
        assert Settings().instances_per_device == instances, cores
        assert Settings(devices=("cpu",)).instances_per_device == instances, cores
    monkeypatch.setattr(service.config, "default_threads", lambda: 2)
    assert Settings(devices="cpu,cuda:0").instances_per_device == 1
    assert Settings(devices=["cuda:0"], instances_per_device=3).instances_per_device == 3
    monkeypatch.setenv("DCLGAN_DEVICES", "cuda:0")
    assert Settings().instances_per_device == 1
    monkeypatch.setenv("DCLGAN_INSTANCES_PER_DEVICE", "4")
    assert Settings().instances_per_device == 4


def test_a_malformed_device_list_is_reported_under_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCLGAN_DEVICES", "cpu,,")
    monkeypatch.setenv("DCLGAN_MAX_BATCH_SIZE", "2")
    monkeypatch.setenv("DCLGAN_INSTANCES_PER_DEVICE", "1")
    with pytest.raises(ValidationError, match=r"(?m)^devices$"):  # the field named on its own line
        Settings()


@pytest.mark.parametrize(
    "limits",
    [
        {"max_pixels": 100_000_000},  # one such image cannot fit the memory budget
        {"max_upload_bytes": 400 * 1024 * 1024},  # nor can one such body
    ],
)
def test_limits_that_contradict_each_other_are_refused(limits: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="max_request_memory_bytes"):
        Settings(**limits)


def test_an_invalid_configuration_stops_the_server_with_one_line_and_status_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(DCLGAN_API_KEYS=" , ", DCLGAN_MAX_BATCH_SIZE="0", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "DCLGAN_API_KEYS: has an empty item" in lines[0] and "DCLGAN_MAX_BATCH_SIZE" in lines[0]
