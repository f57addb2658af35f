"""What a launch may hand its guest: catalog image names, cloud-init user-data and SSH public keys.

A tenant names a catalog image; never a path (guarantee 7). User-data and keys are content, not
paths: the CLI reads the files and sends what they hold, so the API and the workers never open a
file a request names. Each is checked here, once, for the CLI, the API and experiment files alike.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

from orchestrator.model.errors import InvalidInput
from orchestrator.model.names import check_name

#: the most user-data a launch carries (bytes of UTF-8); cloud-init's own limit on EC2 is 16 KiB
USER_DATA_MAX = 64 * 1024
#: the most SSH keys a launch carries, and the longest key line (a 16384-bit RSA key is ~2.8 KB)
SSH_KEYS_MAX = 32
SSH_KEY_MAX = 8 * 1024
#: OpenSSH public key types vmorch accepts (DSA is gone from OpenSSH)
SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
# user-data is text: tab, newline and carriage return, but no other control character
_USER_DATA_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_COMMENT_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f]")
IMAGE_HINT = "name a catalog image (see 'vmorch image list'); an admin adds one with 'vmorch image import'"


def check_image_name(value: str) -> str:
    """A catalog image's name: the rules of a VM's name, and a plain word about paths."""
    if "/" in value or "\\" in value or value.startswith((".", "~")):
        raise InvalidInput(f"image {value[:80]!r} looks like a path: only catalog image names are accepted",
                           hint=IMAGE_HINT)
    return check_name(value, "image name")


def check_user_data(text: str, what: str = "user-data") -> str:
    """cloud-init user-data: UTF-8 text of at most ``USER_DATA_MAX`` bytes."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid UTF-8 text", hint="give a cloud-config (YAML) or a script") from None
    if size > USER_DATA_MAX:
        raise InvalidInput(f"{what} is {size} bytes, more than {USER_DATA_MAX}",
                           hint="keep user-data small; fetch the rest from the guest")
    if not text.strip():
        raise InvalidInput(f"{what} is empty", hint="give a '#cloud-config' document or a script")
    if bad := _USER_DATA_BAD.search(text):
        raise InvalidInput(f"{what} holds the control character {bad[0]!r} at character {bad.start()}",
                           hint="user-data is text: a '#cloud-config' document or a script")
    return text


def check_ssh_key(line: str, what: str = "SSH key") -> str:
    """One OpenSSH public key, ``TYPE BASE64 [COMMENT]``: its type known, its blob decodable and of that
    type. Returned with its whitespace normalised. A private key is refused, saying so."""
    if "PRIVATE KEY" in line:
        raise InvalidInput(f"{what} is a private key: never hand a private key to vmorch",
                           hint="give the public key (the .pub file beside it)")
    if len(line) > SSH_KEY_MAX:
        raise InvalidInput(f"{what} is longer than {SSH_KEY_MAX} characters", hint="give one public key per line")
    parts = line.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise InvalidInput(f"{what} is not an OpenSSH public key ('TYPE BASE64 [COMMENT]' with TYPE one of "
                           f"{', '.join(sorted(SSH_KEY_TYPES))})", hint="give the .pub file ssh-keygen made")
    kind, blob = parts[0], parts[1]
    try:
        raw = base64.b64decode(blob, validate=True)
        (n,) = struct.unpack(">I", raw[:4])
        inner = raw[4:4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise InvalidInput(f"{what}: its key data is not valid base64 of an SSH key",
                           hint="give the .pub file ssh-keygen made") from None
    if inner != kind or len(raw) <= 4 + n:
        raise InvalidInput(f"{what}: its key data is a {inner!r} key, not {kind!r}",
                           hint="give the .pub file ssh-keygen made")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if bad := _COMMENT_BAD.search(comment):
        raise InvalidInput(f"{what}: its comment holds the control character {bad[0]!r}",
                           hint="keep key comments printable")
    return " ".join(p for p in (kind, blob, comment) if p)


def ssh_keys_in(text: str, what: str) -> list[str]:
    """Every public key of a file's text (an ``authorized_keys``-style file: blank lines and ``#``
    comments skipped), each checked; at least one."""
    if "PRIVATE KEY" in text:
        raise InvalidInput(f"{what} holds a private key: never hand a private key to vmorch",
                           hint="give the public key (the .pub file beside it)")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InvalidInput(f"{what} holds no public key", hint="give the .pub file ssh-keygen made")
    return [check_ssh_key(ln, f"{what} line {i}") for i, ln in enumerate(lines, 1)]
