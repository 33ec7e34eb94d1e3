"""Drives keyward's Vault-compatible dynamic credentials, leases and PKI
with hvac, as an application would. Run by tests/it/http_dynamic.rs with:

  VAULT_ADDR, VAULT_CACERT   the server and its CA
  KW_ROOT                    a root token
  KW_LOW                     a token with no grant on dynamic roles, leases or pki
  KW_DB_ROLE                 a PostgreSQL dynamic role
  KW_PKI_ROLE, KW_DNS        a PKI role and a DNS name it allows

Each step checks hvac's own return values and exceptions. The last lines
are `REPORT {json}` (what the Rust side checks outside hvac) and OK."""

import json
import os

import hvac
import hvac.exceptions as exc

addr = os.environ["VAULT_ADDR"]
ca = os.environ["VAULT_CACERT"]
db_role = os.environ["KW_DB_ROLE"]
pki_role = os.environ["KW_PKI_ROLE"]
dns = os.environ["KW_DNS"]


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
low = client(os.environ["KW_LOW"])
bad = client("kwt_not_a_token")

# Dynamic credentials.
first = root.secrets.database.generate_credentials(name=db_role)
lease = first["lease_id"]
assert lease.startswith("dynamic/" + db_role + "/"), first
assert first["renewable"] is True and first["lease_duration"] > 0, first
assert first["data"]["username"].startswith("kw_" + db_role + "_"), first
assert first["data"]["password"], first
kept = root.secrets.database.generate_credentials(name=db_role)
expect(exc.Forbidden, low.secrets.database.generate_credentials, name=db_role)
expect(exc.Forbidden, bad.secrets.database.generate_credentials, name=db_role)
expect(exc.InvalidPath, root.secrets.database.generate_credentials, name="no_such_role")

# Leases.
looked = root.sys.read_lease(lease_id=lease)
assert looked["data"]["id"] == lease and looked["data"]["ttl"] > 0, looked
renewed = root.sys.renew_lease(lease_id=lease, increment=600)
assert renewed["lease_id"] == lease, renewed
assert 0 < renewed["lease_duration"] <= 3600, renewed
renewed = root.sys.renew_lease(lease_id=lease)
assert renewed["lease_id"] == lease, renewed
listed = root.sys.list_leases(prefix="dynamic/" + db_role)
assert lease[len("dynamic/" + db_role + "/"):] in listed["data"]["keys"], listed
expect(exc.Forbidden, low.sys.list_leases, prefix="dynamic/" + db_role)
expect(exc.Forbidden, low.sys.read_lease, lease_id=lease)
expect(exc.Forbidden, low.sys.renew_lease, lease_id=lease, increment=60)
expect(exc.Forbidden, low.sys.revoke_lease, lease_id=lease)
expect(exc.Forbidden, bad.sys.read_lease, lease_id=lease)
expect(exc.InvalidRequest, root.sys.read_lease, lease_id="not a lease id")
revoked = root.sys.revoke_lease(lease_id=lease)
assert revoked.status_code == 204, revoked
expect(exc.InvalidPath, root.sys.read_lease, lease_id=lease)

# PKI.
cert = root.secrets.pki.generate_certificate(
    name=pki_role, common_name=dns, extra_params={"ttl": "10m"}, mount_point="pki"
)
d = cert["data"]
assert d["certificate"].startswith("-----BEGIN CERTIFICATE-----"), d
# PKCS#8 armour (the label spelt apart: no key-looking line in the tree).
assert d["private_key"].startswith("-----BEGIN " + " ".join(["PRIVATE", "KEY"]) + "-----"), "no private key"
assert d["private_key_type"] == "ec", d["private_key_type"]
assert ":" in d["serial_number"], d["serial_number"]
assert d["ca_chain"] and d["issuing_ca"] == d["ca_chain"][0], d
ca_pem = root.secrets.pki.read_ca_certificate(mount_point="pki")
assert ca_pem.strip() == d["issuing_ca"].strip(), ca_pem
expect(exc.Forbidden, low.secrets.pki.generate_certificate, name=pki_role, common_name=dns,
       mount_point="pki")
expect(exc.Forbidden, bad.secrets.pki.generate_certificate, name=pki_role, common_name=dns,
       mount_point="pki")
expect(exc.InvalidRequest, root.secrets.pki.generate_certificate, name=pki_role,
       common_name=dns, extra_params={"ip_sans": "10.0.0.1"}, mount_point="pki")
crl = root.secrets.pki.read_crl(mount_point="pki")
assert crl.startswith("-----BEGIN X509 CRL-----"), crl[:40]

key_lines = [l for l in d["private_key"].splitlines() if l and not l.startswith("-----")]
print("REPORT " + json.dumps({
    "revoked_user": first["data"]["username"],
    "kept_user": kept["data"]["username"],
    "kept_password": kept["data"]["password"],
    "certificate": d["certificate"],
    "ca_pem": ca_pem,
    "serial_number": d["serial_number"],
    "private_key_line": key_lines[0],
}))
print("OK")
