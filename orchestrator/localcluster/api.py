"""The local cluster's HTTP API: its process, and the admin token the local CLI uses with it.

Authentication is on, on loopback too: ``vmorch up`` keeps an admin token (every namespace)
in ``<home>/token`` (mode 0600), which ``vmorch`` reads when it talks to the API
(``VMORCH_API_URL``) without ``--token``/``VMORCH_TOKEN``. The token lives in the cluster's
Redis like any other; a token file that no longer matches one (a purged Redis) is replaced.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import httpx

from orchestrator.model.errors import NotFound
from orchestrator.store.redisconn import connect
from orchestrator.store.tokens import Role, TokenStore

#: the name of the token ``vmorch up`` makes
LOCAL_ADMIN = "local-admin"


def ensure_admin_token(redis_url: str, path: Path) -> bool:
    """Make sure ``path`` holds a valid admin token of this cluster; True when a new one was made."""
    with connect(redis_url, retries=5) as redis:
        tokens = TokenStore(redis)
        try:
            secret = path.read_text().strip()
        except OSError:
            secret = ""
        if secret and tokens.lookup(secret) is not None:
            return False
        with contextlib.suppress(NotFound):
            tokens.revoke(LOCAL_ADMIN)
        secret, _ = tokens.create(LOCAL_ADMIN, Role.ADMIN, ["*"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)
    return True


def api_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "cli", "api", "--host", "127.0.0.1", "--port", str(port), "--loglevel", "WARNING"]


def api_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
