"""Settings read ``VMORCH_*`` environment variables as pydantic-settings did, without importing it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.model.settings import Settings

from .conftest import PYTHON, ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("VMORCH_"):
            monkeypatch.delenv(name)


def test_fields_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMORCH_REDIS_URL", "redis://example:6380/1")
    monkeypatch.setenv("VMORCH_HOME", "/tmp/vmorch-home")
    monkeypatch.setenv("VMORCH_LOCK_EXPIRE", "7")
    monkeypatch.setenv("VMORCH_HOST_DOWN_AFTER", "2.5")
    monkeypatch.setenv("VMORCH_API_AUTH", "0")
    monkeypatch.setenv("vmorch_namespace", "lower")  # names match in any case
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/1"
    assert settings.home == Path("/tmp/vmorch-home")
    assert (settings.lock_expire, settings.host_down_after, settings.api_auth) == (7, 2.5, False)
    assert settings.namespace == "lower"


def test_only_the_prefix_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "bare")
    monkeypatch.setenv("OTHER_NAMESPACE", "other")
    monkeypatch.setenv("VMORCH_NO_SUCH_SETTING", "x")  # ignored, as unknown keywords are
    assert Settings().namespace == "default"
    assert Settings(no_such_setting=1).namespace == "default"  # type: ignore[call-arg]


def test_keywords_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMORCH_REDIS_URL", "redis://from-env/0")
    monkeypatch.setenv("VMORCH_LOCK_EXPIRE", "7")
    settings = Settings(redis_url="redis://from-keyword/0")
    assert (settings.redis_url, settings.lock_expire) == ("redis://from-keyword/0", 7)
    assert Settings(redis_url=None).redis_url is None  # an explicit None too
    copy = settings.model_copy(update={"namespace": "copied"})
    assert (copy.namespace, copy.redis_url, copy.lock_expire) == ("copied", "redis://from-keyword/0", 7)


def test_bad_environment_value_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMORCH_LOCK_EXPIRE", "1")
    with pytest.raises(ValidationError) as info:
        Settings()
    first = info.value.errors()[0]
    assert (first["loc"], first["input"]) == (("lock_expire",), "1")
    monkeypatch.setenv("VMORCH_LOCK_EXPIRE", "soon")
    with pytest.raises(ValidationError, match="lock_expire"):
        Settings()


def test_cli_reports_a_bad_environment_value_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VMORCH_")}
    env["VMORCH_LOCK_EXPIRE"] = "1"
    done = subprocess.run([PYTHON, "-m", "cli", "vm", "list"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "error: bad setting lock_expire: Input should be greater than or equal to 2"
    assert "Traceback" not in done.stderr
