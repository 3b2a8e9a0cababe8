"""API keys: creation, revocation and verification, kept in one JSON file.

Contract:

- A key is ``ml_live_`` + 32 url-safe random characters (192 bits). The full key (the *secret*)
  is returned exactly once, by :meth:`KeyStore.create`; it is never stored, logged or returned
  again. The file holds only its SHA-256 hex digest and a short non-secret ``prefix``
  (``ml_live_`` + the first 4 random characters) so an operator can tell keys apart.
- Each record has ``key_id`` (``key_`` + 16 hex chars, not secret), ``role`` (``"customer"`` or
  ``"admin"``), ``customer_id`` (required for customer keys, ``None`` for admin keys),
  ``created_at`` (UTC, ISO 8601) and ``revoked``.
- The file (``settings.data_dir / "api_keys.json"``, mode 0600) is rewritten atomically
  (temporary file in the same directory + fsync + ``os.replace``) while holding an exclusive
  ``fcntl`` lock on a sibling ``.lock`` file, so concurrent CLI invocations and a running server
  never lose each other's changes. Every mutation re-reads the file under the lock first.
- Readers (the server) re-read the file whenever its mtime/size/inode changes, so a key created or
  revoked by ``meterline keys ...`` in another process takes effect on the next request.
- :meth:`KeyStore.verify` hashes the presented secret and compares it with every stored hash using
  :func:`hmac.compare_digest` (no early exit), then ignores revoked records.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from meterline.core.errors import ConfigError, InputError

__all__ = ["KEYS_FILENAME", "KEY_PREFIX", "KeyRecord", "KeyStore", "Role", "hash_secret"]

log = logging.getLogger(__name__)

KEY_PREFIX = "ml_live_"
KEYS_FILENAME = "api_keys.json"
_RANDOM_CHARS = 32  # secrets.token_urlsafe(24) -> exactly 32 url-safe characters
_DISPLAY_CHARS = 4
_FILE_VERSION = 1

Role = Literal["customer", "admin"]


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a full key; what the file stores."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key. Holds no secret: ``key_hash`` is a SHA-256 digest, ``prefix`` is for display."""

    key_id: str
    prefix: str
    role: Role
    customer_id: str | None
    created_at: datetime
    revoked: bool
    key_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_act_for(self, customer_id: str) -> bool:
        """True when this key may read or write data of ``customer_id``."""
        return self.is_admin or (self.customer_id is not None and self.customer_id == customer_id)

    def public_dict(self) -> dict[str, Any]:
        """Display form (no hash): what ``meterline keys list`` prints."""
        return {
            "key_id": self.key_id,
            "prefix": self.prefix,
            "role": self.role,
            "customer_id": self.customer_id,
            "created_at": self.created_at.isoformat(),
            "revoked": self.revoked,
        }

    def _to_json(self) -> dict[str, Any]:
        return {**self.public_dict(), "key_hash": self.key_hash}

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> KeyRecord:
        role = d["role"]
        if role not in ("customer", "admin"):
            raise ValueError(f"unknown role {role!r}")
        created = datetime.fromisoformat(d["created_at"])
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return cls(
            key_id=str(d["key_id"]),
            prefix=str(d["prefix"]),
            role=role,
            customer_id=d.get("customer_id"),
            created_at=created,
            revoked=bool(d.get("revoked", False)),
            key_hash=str(d["key_hash"]),
        )


class KeyStore:
    """API keys in one JSON file; safe across threads of one process and across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> KeyStore:
        """The store at ``data_dir / api_keys.json`` (the settings' default location)."""
        return cls(Path(data_dir) / KEYS_FILENAME)

    # ---------------------------------------------------------------- public API

    def create(self, customer_id: str | None, role: Role = "customer") -> tuple[str, str]:
        """Create a key; return ``(key_id, secret)``. The secret is not recoverable afterwards.

        Customer keys need a non-empty ``customer_id``; admin keys must not have one.
        """
        if role not in ("customer", "admin"):
            raise InputError(f"role must be 'customer' or 'admin', got {role!r}", reason_code="invalid_role")
        if role == "customer":
            if not customer_id or not customer_id.strip():
                raise InputError("a customer key needs a customer_id", reason_code="missing_customer_id")
            from schemas.models import CUSTOMER_ID_RULE, is_customer_id

            if not is_customer_id(customer_id):
                raise InputError(CUSTOMER_ID_RULE, reason_code="invalid_customer_id", field="customer_id")
        elif customer_id is not None:
            raise InputError("an admin key has no customer_id", reason_code="invalid_role")
        random_part = secrets.token_urlsafe(24)
        assert len(random_part) == _RANDOM_CHARS
        secret = KEY_PREFIX + random_part
        record = KeyRecord(
            key_id="key_" + secrets.token_hex(8),
            prefix=KEY_PREFIX + random_part[:_DISPLAY_CHARS],
            role=role,
            customer_id=customer_id,
            created_at=datetime.now(UTC).replace(microsecond=0),
            revoked=False,
            key_hash=hash_secret(secret),
        )
        with self._locked_update() as records:
            records[record.key_id] = record
        log.info("api key created key_id=%s role=%s customer_id=%s", record.key_id, role, customer_id)
        return record.key_id, secret

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark a key revoked (idempotent); raise InputError(``unknown_key``) for an unknown id."""
        with self._locked_update() as records:
            current = records.get(key_id)
            if current is None:
                raise InputError(f"no API key with id {key_id!r}", reason_code="unknown_key", field="key_id")
            updated = replace(current, revoked=True)
            records[key_id] = updated
        log.info("api key revoked key_id=%s", key_id)
        return updated

    def verify(self, secret: str) -> KeyRecord | None:
        """The live (not revoked) record whose hash matches ``secret``, else ``None``."""
        if not isinstance(secret, str) or not secret.startswith(KEY_PREFIX):
            return None
        presented = hash_secret(secret).encode("ascii")
        match: KeyRecord | None = None
        for rec in self._snapshot():
            # compare against every record; no early exit on a match
            if hmac.compare_digest(presented, rec.key_hash.encode("ascii")):
                match = rec
        if match is None or match.revoked:
            return None
        return match

    def get(self, key_id: str) -> KeyRecord | None:
        for rec in self._snapshot():
            if rec.key_id == key_id:
                return rec
        return None

    def list(self) -> list[KeyRecord]:
        """All records (revoked included), in creation order."""
        return self._snapshot()

    # ---------------------------------------------------------------- file handling

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _snapshot(self) -> list[KeyRecord]:
        """Current records, re-reading the file if it changed since the last read."""
        with self._mutex:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._records = self._read_file()
                self._stamp = stamp
            return list(self._records.values())

    def _read_file(self) -> dict[str, KeyRecord]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            return {r.key_id: r for r in (KeyRecord._from_json(d) for d in doc.get("keys", []))}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"API key file {self.path} is corrupt: {exc}") from exc

    @contextmanager
    def _locked_update(self) -> Iterator[dict[str, KeyRecord]]:
        """Exclusive cross-process lock; yield the freshly read records; write them back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._mutex, open(self._lock_path, "a+") as lock_fh:
            fcntl.flock(lock_fh.fileno(), fcntl.LOCK_EX)
            try:
                records = self._read_file()
                yield records
                self._write_file(records)
                self._records = records
                self._stamp = self._file_stamp()
            finally:
                fcntl.flock(lock_fh.fileno(), fcntl.LOCK_UN)

    def _write_file(self, records: dict[str, KeyRecord]) -> None:
        doc = {"version": _FILE_VERSION, "keys": [r._to_json() for r in records.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".api_keys.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                json.dump(doc, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
