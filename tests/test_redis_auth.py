"""A Redis with a password, and a Redis over TLS (``rediss://``): worker, API and CLI all work through it.

Each test starts its own redis-server (the session's has neither), a worker on test:///default,
the API in a thread, and drives a VM through the CLI both straight to Redis and over HTTP.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.control.queue import broker_ssl
from orchestrator.model.settings import Settings

from .apiserver import serve
from .conftest import free_port, run_cli, running_hosts, start_worker, wait_until
from .helpers import redis_url_pings

PASSWORD = "s3cret-p@ss/word"  # characters a URL must quote
QUOTED = "s3cret-p%40ss%2Fword"

pytestmark = pytest.mark.slow


def _redis(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "no", "--logfile", str(tmp / "redis.log"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _certificate(tmp: Path) -> Path | None:
    """A self-signed certificate for 127.0.0.1 (cert and key in one file), or None without openssl."""
    if shutil.which("openssl") is None:
        return None
    pem, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(pem), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return pem


@pytest.fixture(params=["password", "tls"])
def secured_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh redis-server that needs a password (and, for "tls", speaks only TLS)."""
    port = free_port()
    if request.param == "password":
        proc = _redis(tmp_path, "--port", str(port), "--requirepass", PASSWORD)
        url = f"redis://:{QUOTED}@127.0.0.1:{port}/0"
    else:
        cert = _certificate(tmp_path)
        if cert is None:
            pytest.skip("openssl is not installed: no certificate for a TLS Redis")
        key = tmp_path / "key.pem"
        proc = _redis(tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                      "--requirepass", PASSWORD)
        url = f"rediss://:{QUOTED}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        wait_until(lambda: proc.poll() is None and redis_url_pings(url), timeout=10,
                   what=f"{request.param} redis-server")
        # and without the password (or without TLS), nothing
        assert not redis_url_pings(url.replace(f":{QUOTED}@", "@"))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_worker_api_and_cli_through_a_secured_redis(secured_redis: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=secured_redis, home=tmp_path / "home", namespace="sec", lock_expire=4,
                        heartbeat_interval=0.5, host_down_after=3.0, wait_poll_interval=0.5)
    settings.home.mkdir()
    with running_hosts(settings, start_worker(settings, "s1")), serve(settings) as api:
        direct = run_cli(settings, "--json", "vm", "launch", "v1", "--memory", "16", "--disk", "0", "--wait")
        assert direct.returncode == 0, direct.stderr
        over_http = settings.model_copy(update={"api_url": api.url, "token": api.admin_token})
        for op in ("pause", "resume", "kill"):
            proc = run_cli(over_http, "vm", op, "v1", "--wait")
            assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stderr
        assert run_cli(settings, "vm", "delete", "v1", "--wait").returncode == 0
        made = run_cli(settings, "--json", "token", "create", "sec-reader")
        assert made.returncode == 0, made.stderr
        assert run_cli(settings, "token", "revoke", "sec-reader").returncode == 0


def test_rediss_urls_reach_kombu_with_the_certificate_checked() -> None:
    import ssl

    assert broker_ssl("redis://:pw@h:6379/0") is None
    assert broker_ssl("rediss://:pw@h:6379/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl("rediss://h/0?ssl_cert_reqs=CERT_NONE&ssl_ca_certs=/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_NONE, "ssl_ca_certs": "/ca.pem"}
