"""What ``vm launch --cloud-init FILE --ssh-key FILE`` reads: files of the user's machine, sent as content.

The cluster never opens a path a user names (guarantee 7): the CLI reads the files here, checks what
they hold (the same checks the API and the workers apply) and sends the text.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.model.errors import InvalidInput
from orchestrator.model.guestdata import SSH_KEY_MAX, SSH_KEYS_MAX, USER_DATA_MAX, check_user_data, ssh_keys_in


def _read(path: Path, option: str, limit: int) -> str:
    try:
        if not path.is_file():
            raise InvalidInput(f"{option} {path}: not a file", hint="give the path of a file on this machine")
        if path.stat().st_size > limit:
            raise InvalidInput(f"{option} {path}: larger than {limit} bytes", hint="give a smaller file")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{option} {path}: not UTF-8 text", hint="give a text file") from None
    except OSError as exc:
        raise InvalidInput(f"{option} {path}: {exc.strerror}", hint="give a file you can read") from None


def user_data(path: Path | None) -> str | None:
    """The user-data of ``--cloud-init FILE``, checked (at most ``USER_DATA_MAX`` bytes of text)."""
    if path is None:
        return None
    return check_user_data(_read(path, "--cloud-init", USER_DATA_MAX), f"--cloud-init {path}")


def ssh_keys(paths: list[Path] | None) -> list[str]:
    """The public keys of every ``--ssh-key FILE`` (each file one key or more, as ``authorized_keys``)."""
    keys: list[str] = []
    for path in paths or []:
        keys += ssh_keys_in(_read(path, "--ssh-key", SSH_KEYS_MAX * SSH_KEY_MAX), f"--ssh-key {path}")
    if len(keys) > SSH_KEYS_MAX:
        raise InvalidInput(f"--ssh-key: {len(keys)} keys, more than {SSH_KEYS_MAX}", hint="give fewer keys")
    return keys
