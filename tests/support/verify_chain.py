"""Verifies a keyward certificate folder with a strict RFC 5280 verifier.

Usage: verify_chain.py CA SERVER CLIENT [CLIENT...]

Python's `cryptography` (>= 42) path validation follows RFC 5280 and the
CA/Browser Forum profile: it refuses a leaf without an Authority Key
Identifier, a CA without keyCertSign or a critical CA:true, a leaf without the
right extended key usage. Prints "ok" and exits 0, or names every refusal and
exits 1.
"""

import ipaddress
import sys

import cryptography
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


def load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def extension(cert, kind):
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def main():
    ca = load(sys.argv[1])
    server = load(sys.argv[2])
    clients = [load(p) for p in sys.argv[3:]]
    failures = []
    builder = PolicyBuilder().store(Store([ca]))

    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        try:
            builder.build_server_verifier(name).verify(server, [])
        except VerificationError as e:
            failures.append(f"server certificate for {name.value}: {e}")
    for i, client in enumerate(clients):
        try:
            builder.build_client_verifier().verify(client, [])
        except VerificationError as e:
            failures.append(f"client certificate {i + 1}: {e}")

    # The verifier is not a rubber stamp: wrong names and purposes are refused.
    for what, check in (
        ("the server certificate for example.com",
         lambda: builder.build_server_verifier(x509.DNSName("example.com")).verify(server, [])),
        ("the server certificate as a client's",
         lambda: builder.build_client_verifier().verify(server, [])),
        ("a client certificate as a server's",
         lambda: builder.build_server_verifier(x509.DNSName("localhost")).verify(clients[0], [])),
    ):
        try:
            check()
            failures.append(f"{what} was accepted")
        except VerificationError:
            pass

    # The profile itself, named so that a failure says what is missing.
    ski = extension(ca, x509.SubjectKeyIdentifier)
    if ski is None:
        failures.append("the CA has no Subject Key Identifier")
    bc = extension(ca, x509.BasicConstraints)
    if bc is None or not bc.critical or not bc.value.ca:
        failures.append("the CA lacks a critical basicConstraints CA:true")
    ku = extension(ca, x509.KeyUsage)
    if ku is None or not ku.value.key_cert_sign or not ku.value.crl_sign:
        failures.append("the CA's key usage lacks keyCertSign or cRLSign")
    for what, leaf, purpose in [("server", server, ExtendedKeyUsageOID.SERVER_AUTH)] + [
        (f"client {i + 1}", c, ExtendedKeyUsageOID.CLIENT_AUTH) for i, c in enumerate(clients)
    ]:
        aki = extension(leaf, x509.AuthorityKeyIdentifier)
        if aki is None or ski is None or aki.value.key_identifier != ski.value.digest:
            failures.append(f"the {what} certificate's Authority Key Identifier is not the CA's key")
        if extension(leaf, x509.SubjectKeyIdentifier) is None:
            failures.append(f"the {what} certificate has no Subject Key Identifier")
        ku = extension(leaf, x509.KeyUsage)
        if ku is None or not ku.value.digital_signature or ku.value.key_cert_sign:
            failures.append(f"the {what} certificate's key usage is not digitalSignature (without keyCertSign)")
        eku = extension(leaf, x509.ExtendedKeyUsage)
        if eku is None or list(eku.value) != [purpose]:
            failures.append(f"the {what} certificate's extended key usage is not only {purpose._name}")

    if failures:
        print(f"cryptography {cryptography.__version__} refused:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
