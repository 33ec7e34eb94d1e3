"""Drives keyward's Vault-compatible API with hvac, the Python Vault client,
as an application would. Run by tests/it/http_clients.rs with:

  VAULT_ADDR, VAULT_CACERT   the server and its CA
  KW_ROOT                    a root token
  KW_LOW                     a token allowed only read on secret/<KW_PREFIX>/**
  KW_ROLE_ID, KW_SECRET_ID   an AppRole credential
  KW_PREFIX                  a fresh secret prefix
  KW_SHARE                   the unseal share (the script seals and unseals)

Each step checks hvac's own return values and exceptions; any mismatch
raises, and the script exits non-zero. It prints OK at the end."""

import os
import sys

import hvac
import hvac.exceptions as exc

addr = os.environ["VAULT_ADDR"]
ca = os.environ["VAULT_CACERT"]
prefix = os.environ["KW_PREFIX"]
path = prefix + "/db"


def client(token):
    return hvac.Client(url=addr, token=token, verify=ca)


def expect(exception, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exception:
        return
    except Exception as e:  # noqa: BLE001 - the wrong exception is a failure
        raise AssertionError(f"expected {exception.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {exception.__name__}, got success")


root = client(os.environ["KW_ROOT"])
assert root.is_authenticated(), "the root token is not accepted"
assert root.sys.is_initialized()
assert not root.sys.is_sealed()
health = root.sys.read_health_status(method="GET")
assert health["initialized"] and not health["sealed"], health

kv = root.secrets.kv.v2
written = kv.create_or_update_secret(path=path, secret={"password": "hvac-1"}, mount_point="secret")
assert written["data"]["version"] == 1, written
kv.create_or_update_secret(path=path, secret={"password": "hvac-2"}, cas=1, mount_point="secret")
expect(exc.InvalidRequest, kv.create_or_update_secret, path=path, secret={"x": "y"}, cas=1,
       mount_point="secret")
got = kv.read_secret_version(path=path, mount_point="secret", raise_on_deleted_version=True)
assert got["data"]["data"] == {"password": "hvac-2"}, got
old = kv.read_secret_version(path=path, version=1, mount_point="secret",
                             raise_on_deleted_version=True)
assert old["data"]["data"]["password"] == "hvac-1", old
meta = kv.read_secret_metadata(path=path, mount_point="secret")
assert meta["data"]["current_version"] == 2, meta
listed = kv.list_secrets(path=prefix, mount_point="secret")
assert listed["data"]["keys"] == ["db"], listed
kv.delete_latest_version_of_secret(path=path, mount_point="secret")
expect(exc.InvalidPath, kv.read_secret_version, path=path, mount_point="secret",
       raise_on_deleted_version=True)
kv.undelete_secret_versions(path=path, versions=[2], mount_point="secret")
kv.destroy_secret_versions(path=path, versions=[1], mount_point="secret")
meta = kv.read_secret_metadata(path=path, mount_point="secret")
assert meta["data"]["versions"]["1"]["destroyed"] is True, meta
# Not found.
expect(exc.InvalidPath, kv.read_secret_version, path=prefix + "/missing", mount_point="secret",
       raise_on_deleted_version=True)

# A low-privileged token: reads its prefix, is refused elsewhere (Forbidden).
low = client(os.environ["KW_LOW"])
got = low.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                            raise_on_deleted_version=True)
assert got["data"]["data"]["password"] == "hvac-2"
expect(exc.Forbidden, low.secrets.kv.v2.create_or_update_secret, path=path,
       secret={"password": "stolen"}, mount_point="secret")
expect(exc.Forbidden, low.secrets.kv.v2.read_secret_version, path="elsewhere/x",
       mount_point="secret", raise_on_deleted_version=True)
expect(exc.Forbidden, low.sys.seal)
# A bad token.
bad = client("kwt_notavalidtoken")
assert not bad.is_authenticated()
expect(exc.Forbidden, bad.secrets.kv.v2.read_secret_version, path=path, mount_point="secret",
       raise_on_deleted_version=True)

# AppRole login, then the token endpoints.
app = hvac.Client(url=addr, verify=ca)
login = app.auth.approle.login(role_id=os.environ["KW_ROLE_ID"],
                               secret_id=os.environ["KW_SECRET_ID"])
assert login["auth"]["client_token"].startswith("kwt_"), login
assert app.is_authenticated()
expect(exc.Forbidden, hvac.Client(url=addr, verify=ca).auth.approle.login,
       role_id=os.environ["KW_ROLE_ID"], secret_id="wrong")
made = root.auth.token.create(policies=["root"], ttl="1h")
child = made["auth"]["client_token"]
looked = root.auth.token.lookup(child)
assert looked["data"]["accessor"] == made["auth"]["accessor"], looked
assert client(child).auth.token.lookup_self()["data"]["id"] == child
renewed = client(child).auth.token.renew_self(increment="2h")
assert renewed["auth"]["client_token"] == child
root.auth.token.revoke(child)
assert not client(child).is_authenticated()
expect(exc.Forbidden, client(child).auth.token.lookup_self)

# Sealed: VaultDown; unsealed again with the share.
root.sys.seal()
assert root.sys.is_sealed()
expect(exc.VaultDown, kv.read_secret_version, path=path, mount_point="secret",
       raise_on_deleted_version=True)
state = root.sys.submit_unseal_key(os.environ["KW_SHARE"])
assert state["sealed"] is False, state
got = kv.read_secret_version(path=path, mount_point="secret", raise_on_deleted_version=True)
assert got["data"]["data"]["password"] == "hvac-2"

print("OK")
sys.exit(0)
