"""KeyStore: secrets shown once, stored hashed, atomic cross-process file, live reload."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meterline.core.errors import InputError
from meterline.shell.api.keys import KEY_PREFIX, KeyStore, hash_secret


def test_create_returns_secret_once_and_file_holds_only_hash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = KeyStore.for_data_dir(tmp_path)
    key_id, secret = store.create("cust-a")
    assert secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + 32
    raw = (tmp_path / "api_keys.json").read_text()
    assert secret not in raw and secret[len(KEY_PREFIX) :] not in raw
    assert hash_secret(secret) in raw
    assert stat.S_IMODE((tmp_path / "api_keys.json").stat().st_mode) == 0o600
    (rec,) = json.loads(raw)["keys"]
    assert rec["key_id"] == key_id and rec["customer_id"] == "cust-a" and rec["role"] == "customer"
    assert secret.startswith(rec["prefix"]) and len(rec["prefix"]) == len(KEY_PREFIX) + 4
    assert secret not in caplog.text and key_id in caplog.text


def test_verify_and_revoke(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.json")
    kid_a, sec_a = store.create("cust-a")
    kid_admin, sec_admin = store.create(None, role="admin")
    rec = store.verify(sec_a)
    assert rec is not None and rec.key_id == kid_a and rec.can_act_for("cust-a") and not rec.can_act_for("cust-b")
    admin = store.verify(sec_admin)
    assert admin is not None and admin.is_admin and admin.can_act_for("anyone")
    assert store.verify(sec_a[:-1] + ("A" if sec_a[-1] != "A" else "B")) is None
    assert store.verify("not-a-key") is None
    assert store.verify("") is None
    store.revoke(kid_a)
    assert store.verify(sec_a) is None
    assert store.verify(sec_admin) is not None
    assert [r.revoked for r in store.list()] == [True, False]
    with pytest.raises(InputError) as ei:
        store.revoke("key_nope")
    assert ei.value.reason_code == "unknown_key"


def test_role_rules(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.json")
    with pytest.raises(InputError):
        store.create(None)  # customer key without a customer
    with pytest.raises(InputError):
        store.create("c", role="admin")
    with pytest.raises(InputError):
        store.create("c", role="root")  # type: ignore[arg-type]


def test_changes_from_another_store_are_seen(tmp_path: Path) -> None:
    server_view = KeyStore(tmp_path / "k.json")
    cli = KeyStore(tmp_path / "k.json")
    assert server_view.list() == []
    kid, secret = cli.create("cust-a")
    assert server_view.verify(secret) is not None  # re-read on mtime change
    cli.revoke(kid)
    assert server_view.verify(secret) is None


_CHILD = """
import json, sys
from pathlib import Path
from meterline.shell.api.keys import KeyStore
store = KeyStore(Path(sys.argv[1]))
print(json.dumps([store.create(f"c{sys.argv[2]}-{i}") for i in range(int(sys.argv[3]))]))
"""


def test_concurrent_processes_lose_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(n), "15"], stdout=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    created = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        created.extend(json.loads(out))
    store = KeyStore(path)
    assert len(store.list()) == 45
    for key_id, secret in created:
        rec = store.verify(secret)
        assert rec is not None and rec.key_id == key_id
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_public_surface_is_pinned() -> None:
    import meterline.shell.api as api

    assert api.__all__ == sorted(
        [
            "MAX_BODY_BYTES",
            "MAX_EVENTS",
            "ApiClient",
            "ApiError",
            "ApiServer",
            "KeyRecord",
            "KeyStore",
            "create_api",
            "require_admin",
            "require_customer",
            "require_key",
        ]
    )
    for name in api.__all__:
        assert getattr(api, name) is not None
