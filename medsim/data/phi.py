"""Patient identifiers never reach a datalist, an index, an export or a log in clear.

Identifiers (patient id, study/series UIDs, lesion ids from a hospital system) are replaced by a keyed hash
(HMAC-SHA256 with a per-project salt), so the same patient maps to the same token inside one project, and tokens
from two projects cannot be joined. Names and birth dates are never copied at all: only the fields in
:data:`SAFE_FIELDS` ever leave a source reader.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from medsim.errors import MedsimError

__all__ = ["SAFE_FIELDS", "HASHED_FIELDS", "TOKEN_PREFIX", "TOKEN_RE", "project_anonymizer", "Anonymizer", "load_or_create_salt", "salt_path",
           "check_salt_file"]

#: metadata keys a datalist item may carry; anything else a reader finds is dropped. ``id`` is hashed too: a case id
#: is often a file stem or an MRN (``Doe^Jane 19700101.png``), so cases travel as opaque tokens (``c-<16 hex>``).
HASHED_FIELDS = ("patient", "study", "series", "group", "id")
#: token prefix of each hashed field
TOKEN_PREFIX = {"patient": "p", "study": "s", "series": "s", "group": "g", "id": "c"}
#: what a token looks like
TOKEN_RE = re.compile(r"^[a-z]-[0-9a-f]{16}$")
SAFE_FIELDS = ("image", "mask", "label", "label_name", *HASHED_FIELDS, "view", "laterality", "follow_up",
               "location", "size", "level", "tissue_fraction")

SALT_ENV = "MEDSIM_SALT"
SALT_FILE_ENV = "MEDSIM_SALT_FILE"
DEFAULT_SALT_FILE = ".medsim-salt"

logger = logging.getLogger(__name__)


def salt_path() -> Path:
    """Where the project's salt lives: ``$MEDSIM_SALT_FILE``; else the first ``.medsim-salt`` in the working
    folder or one of its parents (a project keeps one at its root, like ``.git``); else the user's
    ``~/.config/medsim/salt`` — so running from a sub-folder never creates a second salt (which would give the same
    patient two different tokens)."""
    env = os.environ.get(SALT_FILE_ENV)
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / DEFAULT_SALT_FILE).is_file():
            return folder / DEFAULT_SALT_FILE
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "medsim" / "salt"


def load_or_create_salt(path: str | os.PathLike | None = None) -> bytes:
    """The project's salt: ``$MEDSIM_SALT`` if set, else the file ``path`` (default :func:`salt_path`), created
    with 32 random bytes, mode 0600, when missing. Keep the file with the project and out of version control."""
    env = os.environ.get(SALT_ENV)
    if env is not None:
        if not env.strip():
            raise MedsimError(f"{SALT_ENV} is set but empty; set it to the project's salt or unset it (then "
                              f"{SALT_FILE_ENV} or a .medsim-salt file is used)")
        return env.encode()
    p = Path(path) if path is not None else salt_path()
    if p.exists():
        check_salt_file(p)
        try:
            salt = p.read_bytes().strip()
        except OSError as e:
            raise MedsimError(f"{p}: the anonymisation salt cannot be read ({e.strerror or e})") from e
        if not salt:
            raise MedsimError(f"{p}: the anonymisation salt file is empty; delete it to have a new one created, "
                              f"or put the project's salt in it (or set {SALT_ENV})")
        return salt
    p.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(salt)
    logger.warning("created a new anonymisation salt in %s: identifiers hashed with it match only runs that use "
                   "the same salt (keep it; set %s or %s to share one)", p, SALT_ENV, SALT_FILE_ENV)
    return salt


def check_salt_file(path: str | os.PathLike) -> None:
    """Refuse a salt file others could read or change, as ssh refuses a private key: it must be a regular file
    owned by the current user with no group/other permissions (POSIX; not checked on Windows).

    Raises:
        MedsimError: naming the file, what is wrong and the command that fixes it.
    """
    p = Path(path)
    if not p.is_file():
        raise MedsimError(f"{p}: the anonymisation salt must be a file")
    if os.name != "posix":
        return
    st = p.stat()
    if st.st_uid != os.getuid():
        raise MedsimError(f"{p}: the anonymisation salt belongs to another user (uid {st.st_uid}); it is a secret "
                          f"— use your own (chown {os.getuid()} '{p}', or set {SALT_FILE_ENV} to a file you own)")
    if st.st_mode & 0o077:
        raise MedsimError(f"{p}: the anonymisation salt is accessible by others (mode {stat.filemode(st.st_mode)}); "
                          f"it is a secret that re-identifies patients from their tokens — run: chmod 600 '{p}'")


class Anonymizer:
    """Keyed hashing of identifiers: ``Anonymizer(salt)("PAT-001") -> "p-3fa4…"`` (16 hex digits)."""

    def __init__(self, salt: bytes):
        if not salt:
            raise MedsimError("the anonymisation salt is empty; set MEDSIM_SALT or give a salt file")
        self._salt = salt

    def __call__(self, value: object, prefix: str = "h") -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if not text or text.lower() == "nan":
            return None
        digest = hmac.new(self._salt, text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
        return f"{prefix}-{digest}"

    def case_token(self, value: object) -> str:
        """The opaque token of a case (its id, relative path or file path): ``c-<16 hex>``; a token stays as is."""
        text = str(value)
        return text if TOKEN_RE.match(text) else str(self(text, "c"))

    def item(self, item: dict) -> dict:
        """A copy of a datalist item keeping only :data:`SAFE_FIELDS`, with identifiers hashed."""
        out = {}
        for key in SAFE_FIELDS:
            if key in item and item[key] is not None:
                out[key] = self(item[key], TOKEN_PREFIX[key]) if key in HASHED_FIELDS else item[key]
        return out


def project_anonymizer() -> Anonymizer:
    """The :class:`Anonymizer` keyed with this project's salt (:func:`load_or_create_salt`)."""
    return Anonymizer(load_or_create_salt())
