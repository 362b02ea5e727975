"""Bearer-token roles (infer/admin), TLS with a generated self-signed CA, and mTLS."""
from __future__ import annotations

import datetime
import ipaddress
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest

from adapterctl.client import Client
from adapterctl.errors import PermissionDenied, Unauthenticated, Unavailable

INFER, ADMIN = "tok-infer-5d1e0c", "tok-admin-93ab7f"


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# token role\n{INFER} infer\n\n{ADMIN} admin  # ops\n")
    return path


def test_auth_roles(echo_server, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    bg = echo_server(auth_token_file=token_file)
    with Client(bg.address) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        with pytest.raises(Unauthenticated):
            anonymous.generate("hi")
    with Client(bg.address, token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.generate("hi")
    with Client(bg.address, token=INFER) as infer:
        assert infer.generate("hi").text == "hi"
        assert "".join(c.text for c in infer.generate_stream("hey")) == "hey"
        with pytest.raises(PermissionDenied):
            infer.list_adapters()
        with pytest.raises(PermissionDenied):
            infer.refresh_aliases()
    with Client(bg.address, token=ADMIN) as admin:
        assert admin.generate("hi").text == "hi"
        assert admin.list_adapters()[0].name == "echo"
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics").read().decode()
    assert 'adapterctl_auth_failures_total{code="UNAUTHENTICATED"} 2.0' in exposition
    assert 'adapterctl_auth_failures_total{code="PERMISSION_DENIED"} 2.0' in exposition
    for secret in (INFER, ADMIN, "wrong"):
        assert secret not in caplog.text and secret not in exposition


def test_auth_off_admin_is_open(echo_server):
    bg = echo_server()
    with Client(bg.address) as c:
        assert c.list_adapters()[0].name == "echo" and c.generate("x").text == "x"


def test_bad_token_file_is_refused(tmp_path):
    from adapterctl.errors import InvalidArgument
    from adapterctl.server.interceptors import TokenTable

    bad = tmp_path / "bad"
    bad.write_text("only-a-token\n")
    with pytest.raises(InvalidArgument):
        TokenTable.from_file(bad)
    bad.write_text("tok root\n")
    with pytest.raises(InvalidArgument):
        TokenTable.from_file(bad)


# ---- TLS ---------------------------------------------------------------------------------
def _cert(subject: str, issuer_key=None, issuer_name=None, ca: bool = False, san: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(tmp_path: Path, stem: str, key, cert) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = tmp_path / f"{stem}.key", tmp_path / f"{stem}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def pki(tmp_path):
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, all signed by the CA."""
    ca_key, ca_cert = _cert("adapterctl test CA", ca=True)
    files = {"ca": _pem(tmp_path, "ca", ca_key, ca_cert)[1]}
    for stem, san in (("server", True), ("client", False)):
        key, cert = _cert(f"adapterctl {stem}", ca_key, ca_cert.subject, san=san)
        files[f"{stem}_key"], files[f"{stem}_cert"] = _pem(tmp_path, stem, key, cert)
    return files


def test_tls(echo_server, pki):
    bg = echo_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with Client(bg.address, root_certificates=pki["ca"], timeout=10) as c:
        assert c.generate("secure").text == "secure"
    with Client(bg.address, timeout=3) as plaintext, pytest.raises(Unavailable):
        plaintext.generate("x")


def test_mtls_requires_a_client_cert(echo_server, pki):
    bg = echo_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    with Client(bg.address, root_certificates=pki["ca"], client_cert=pki["client_cert"],
                client_key=pki["client_key"], timeout=10) as c:
        assert c.generate("mutual").text == "mutual"
    with Client(bg.address, root_certificates=pki["ca"], timeout=3) as no_cert, pytest.raises(Unavailable):
        no_cert.generate("x")


def test_proto_level_error_codes_for_auth(echo_server, token_file):
    from adapterctl.v1 import adapterctl_pb2 as pb
    from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

    bg = echo_server(auth_token_file=token_file)
    with grpc.insecure_channel(bg.address) as channel:
        stub = pb_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListAdapters(pb.ListAdaptersRequest(), metadata=[("authorization", f"Bearer {INFER}")])
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _other_ca_files(tmp_path: Path) -> dict[str, Path]:
    """A second, unrelated CA and a client cert it signed (nothing the server trusts)."""
    other = tmp_path / "other"
    other.mkdir()
    ca_key, ca_cert = _cert("some other CA", ca=True)
    key, cert = _cert("impostor client", ca_key, ca_cert.subject)
    files = {"ca": _pem(other, "ca", ca_key, ca_cert)[1]}
    files["client_key"], files["client_cert"] = _pem(other, "client", key, cert)
    return files


def test_tls_client_trusting_another_ca_is_refused(echo_server, pki, tmp_path):
    bg = echo_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    other = _other_ca_files(tmp_path)
    with Client(bg.address, root_certificates=other["ca"], timeout=3) as wrong_ca, pytest.raises(Unavailable):
        wrong_ca.generate("x")


def test_mtls_client_cert_from_another_ca_is_refused(echo_server, pki, tmp_path):
    bg = echo_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    other = _other_ca_files(tmp_path)
    with Client(bg.address, root_certificates=pki["ca"], client_cert=other["client_cert"],
                client_key=other["client_key"], timeout=3) as impostor, pytest.raises(Unavailable):
        impostor.generate("x")
    with Client(bg.address, root_certificates=pki["ca"], client_cert=pki["client_cert"],
                client_key=pki["client_key"], timeout=10) as good:
        assert good.generate("still mutual").text == "still mutual"
