"""TLS on the gRPC port (`--ssl_config_file`, as tensorflow_model_server has it), against the real embedded server
over real gRPC, and the clients' TLS options (client.mnist_client.GrpcClient, client/predict.py).

The certificates are made here with `cryptography`, once for the module: a CA, a server certificate it signed for
localhost and 127.0.0.1, a client certificate it signed, and a second, unrelated CA with a client certificate of
its own. One server serves TLS, one TLS with client_verify; both are shared by the module's tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import predict
from client.mnist_client import GrpcClient, ServingError
from serving import configs


@dataclass(frozen=True)
class Issued:
    """A key and the certificate for it, as PEM text and as files."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_file: Path
    cert_file: Path

    @property
    def key_pem(self) -> str:
        return self.key_file.read_text()

    @property
    def cert_pem(self) -> str:
        return self.cert_file.read_text()


def issue(directory: Path, name: str, issuer: Issued | None = None, *, ca: bool = False,
          usage: x509.ObjectIdentifier | None = None, san: list[x509.GeneralName] | None = None) -> Issued:
    """A fresh P-256 key and a certificate for it, signed by issuer (self-signed without one), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key, cert, key_file, cert_file)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued  # signed by other_ca: a server that trusts only `ca` refuses it


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = issue(directory, "ca", ca=True)
    server = issue(directory, "server", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue(directory, "client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca = issue(directory, "other-ca", ca=True)
    other_client = issue(directory, "other-client", other_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(directory, ca, server, client, other_ca, other_client)


def pem_lines(pem: str) -> str:
    """PEM text as README's example writes it in a text proto: one quoted string a line, which the parser joins."""
    return "\n    ".join(f'"{line}\\n"' for line in pem.splitlines())


def ssl_config(path: Path, **fields: str | bool) -> str:
    """An SSLConfig text proto at path, written the way README shows; its path as a string."""
    lines = [f"{name}: {pem_lines(value) if isinstance(value, str) else str(value).lower()}"
             for name, value in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tls_server(serve_module, pki):
    config = ssl_config(pki.directory / "tls.config", server_key=pki.server.key_pem, server_cert=pki.server.cert_pem)
    return serve_module(ssl_config_file=config)


@pytest.fixture(scope="module")
def mtls_server(serve_module, pki):
    config = ssl_config(pki.directory / "mtls.config", server_key=pki.server.key_pem,
                        server_cert=pki.server.cert_pem, custom_ca=pki.ca.cert_pem, client_verify=True)
    return serve_module(ssl_config_file=config)


def images(mnist_png_bytes) -> list[bytes]:
    return [png for png, _ in mnist_png_bytes]


def refusal(client: GrpcClient, mnist_png_bytes) -> ServingError:
    """The error a Predict gets from a server that refuses the connection."""
    with client, pytest.raises(ServingError) as caught:
        client.predict(images(mnist_png_bytes)[:1])
    return caught.value


# --- the server -----------------------------------------------------------------------------------------------------

def test_the_readme_form_of_the_config_parses_to_the_pem_texts(pki):
    config = configs.read_text_proto(ssl_config(pki.directory / "parsed.config", server_key=pki.server.key_pem,
                                                custom_ca=pki.ca.cert_pem, client_verify=True), configs.SSLConfig)
    assert (config.server_key, config.server_cert, config.custom_ca, config.client_verify) == (
        pki.server.key_pem, "", pki.ca.cert_pem, True)
    assert config.DESCRIPTOR.full_name == "tensorflow.serving.SSLConfig"  # tensorflow_model_server's message


def test_predict_over_tls_answers_what_the_plain_server_answers(tls_server, embedded_server, pki, mnist_png_bytes):
    with GrpcClient(f"127.0.0.1:{embedded_server.grpc_port}", timeout=30) as plain:
        expected = plain.predict(images(mnist_png_bytes))
    for host in ("127.0.0.1", "localhost"):  # the certificate names both
        with GrpcClient(f"{host}:{tls_server.grpc_port}", timeout=30, ca=str(pki.ca.cert_file)) as client:
            answered = client.predict(images(mnist_png_bytes))
        assert [p.digit for p in answered] == [p.digit for p in expected]
        for got, want in zip(answered, expected, strict=True):
            assert got.probabilities == pytest.approx(want.probabilities, abs=1e-6)


def test_health_and_model_service_answer_over_tls(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_file.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{tls_server.grpc_port}", credentials) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with GrpcClient(f"127.0.0.1:{tls_server.grpc_port}", tls=True, ca=str(pki.ca.cert_file)) as client:
        assert [(v.version, v.state) for v in client.model_status()] == [(1, "AVAILABLE")]


def test_a_plaintext_client_is_refused_by_the_tls_port(tls_server, mnist_png_bytes):
    error = refusal(GrpcClient(f"127.0.0.1:{tls_server.grpc_port}", timeout=10), mnist_png_bytes)
    assert error.code == "UNAVAILABLE"
    assert "connect with TLS" in error.message, error.message


def test_a_client_trusting_another_ca_is_refused(tls_server, pki, mnist_png_bytes):
    client = GrpcClient(f"127.0.0.1:{tls_server.grpc_port}", timeout=10, ca=str(pki.other_ca.cert_file))
    error = refusal(client, mnist_png_bytes)
    assert error.code == "UNAVAILABLE"
    assert "not signed by a CA this client trusts" in error.message, error.message
    assert "CERTIFICATE_VERIFY_FAILED" in error.message  # grpc's own words are kept


def test_a_tls_client_is_told_when_the_port_is_plaintext(embedded_server, pki, mnist_png_bytes):
    client = GrpcClient(f"127.0.0.1:{embedded_server.grpc_port}", timeout=10, ca=str(pki.ca.cert_file))
    error = refusal(client, mnist_png_bytes)
    assert error.code == "UNAVAILABLE"
    assert "does not speak TLS" in error.message, error.message


def test_client_verify_serves_a_client_with_a_certificate_the_ca_signed(mtls_server, pki, mnist_png_bytes):
    with GrpcClient(f"127.0.0.1:{mtls_server.grpc_port}", timeout=30, ca=str(pki.ca.cert_file),
                    cert=str(pki.client.cert_file), key=str(pki.client.key_file)) as client:
        predictions = client.predict(images(mnist_png_bytes)[:4])
    assert len(predictions) == 4 and all(0 <= p.digit <= 9 for p in predictions)


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_client_verify_refuses_other_clients(mtls_server, pki, mnist_png_bytes, who):
    certificate = {} if who == "no certificate" else {
        "cert": str(pki.other_client.cert_file), "key": str(pki.other_client.key_file)}
    client = GrpcClient(f"127.0.0.1:{mtls_server.grpc_port}", timeout=10, ca=str(pki.ca.cert_file), **certificate)
    error = refusal(client, mnist_png_bytes)
    assert error.code == "UNAVAILABLE", error
    assert "client certificate" in error.message, error.message
    # The server keeps serving the clients it trusts.
    with GrpcClient(f"127.0.0.1:{mtls_server.grpc_port}", timeout=30, ca=str(pki.ca.cert_file),
                    cert=str(pki.client.cert_file), key=str(pki.client.key_file)) as trusted:
        assert trusted.model_status()[0].state == "AVAILABLE"


BAD_CONFIGS = {
    "not parseable": (lambda pki: "server_key: {oops", "not an SSLConfig text proto"),
    "no key": (lambda pki: ssl_config_text(server_cert=pki.server.cert_pem), "no server_key"),
    "no certificate": (lambda pki: ssl_config_text(server_key=pki.server.key_pem), "no server_cert"),
    "client_verify without custom_ca": (
        lambda pki: ssl_config_text(server_key=pki.server.key_pem, server_cert=pki.server.cert_pem,
                                    client_verify=True), "client_verify is true but custom_ca is empty"),
    "a path for the key": (
        lambda pki: ssl_config_text(server_key=str(pki.server.key_file), server_cert=pki.server.cert_pem),
        "server_key is not PEM text"),
    "another certificate's key": (
        lambda pki: ssl_config_text(server_key=pki.client.key_pem, server_cert=pki.server.cert_pem),
        "server_key is not server_cert's key"),
}


def ssl_config_text(**fields: str | bool) -> str:
    return text_format.MessageToString(configs.SSLConfig(**fields))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_ssl_config_stops_the_server_before_anything_loads(serve, pki, tmp_path, case):
    content, problem = BAD_CONFIGS[case]
    path = tmp_path / "ssl.config"
    path.write_text(content(pki))
    # A base path that does not exist: the refusal has to come before any model is looked for.
    with pytest.raises(ValueError) as caught:
        serve(tmp_path / "no-models", ssl_config_file=str(path))
    assert str(caught.value).startswith(f"--ssl_config_file={path}: "), caught.value
    assert problem in str(caught.value)


def test_a_missing_ssl_config_stops_the_server(serve, tmp_path):
    path = tmp_path / "absent.config"
    with pytest.raises(ValueError, match=f"--ssl_config_file={path}: cannot read it"):
        serve(tmp_path / "no-models", ssl_config_file=str(path))


# --- the client's options -------------------------------------------------------------------------------------------

def test_client_files_that_cannot_be_used_are_named(pki, tmp_path):
    target = "127.0.0.1:1"  # never connected to: the files are checked first
    with pytest.raises(ValueError, match=r"cannot read the CA certificates file .*absent\.pem"):
        GrpcClient(target, ca=str(tmp_path / "absent.pem"))
    with pytest.raises(ValueError, match="is not a PEM CA certificates file"):
        GrpcClient(target, ca=str(pki.client.key_file))
    with pytest.raises(ValueError, match="go together"):
        GrpcClient(target, cert=str(pki.client.cert_file))
    with pytest.raises(ValueError, match=f"{pki.other_client.key_file} is not the private key of"):
        GrpcClient(target, cert=str(pki.client.cert_file), key=str(pki.other_client.key_file))


def test_cli_predicts_over_tls(tls_server, mtls_server, embedded_server, pki, tmp_path, mnist_png_bytes, capsys):
    digit = tmp_path / "digit.png"
    digit.write_bytes(mnist_png_bytes[0][0])
    assert predict.main(["--protocol", "grpc", "--server", f"127.0.0.1:{embedded_server.grpc_port}",
                         str(digit)]) == predict.EXIT_OK
    plain = capsys.readouterr().out
    assert predict.main(["--protocol", "grpc", "--tls", "--ca", str(pki.ca.cert_file),
                         "--server", f"127.0.0.1:{tls_server.grpc_port}", str(digit)]) == predict.EXIT_OK
    assert capsys.readouterr().out == plain
    # --ca, --cert and --key imply --tls.
    assert predict.main(["--protocol", "grpc", "--ca", str(pki.ca.cert_file), "--cert", str(pki.client.cert_file),
                         "--key", str(pki.client.key_file), "--server", f"127.0.0.1:{mtls_server.grpc_port}",
                         str(digit)]) == predict.EXIT_OK
    assert capsys.readouterr().out == plain


def test_cli_reports_a_failed_handshake_as_unreachable(tls_server, pki, tmp_path, mnist_png_bytes, capsys):
    digit = tmp_path / "digit.png"
    digit.write_bytes(mnist_png_bytes[0][0])
    assert predict.main(["--protocol", "grpc", "--ca", str(pki.other_ca.cert_file), "--timeout", "10",
                         "--server", f"127.0.0.1:{tls_server.grpc_port}", str(digit)]) == predict.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "not signed by a CA this client trusts" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--tls"], "--tls: TLS is for --protocol grpc only"),
    (["--protocol", "rest", "--ca", "ca.pem"], "--ca: TLS is for --protocol grpc only"),
    (["--protocol", "grpc", "--cert", "client.pem"], "--cert and --key go together"),
    (["--protocol", "grpc", "--key", "client.key"], "--cert and --key go together"),
])
def test_cli_tls_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        predict.main([*argv, "digit.png"])
    assert caught.value.code == predict.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_names_a_file_it_cannot_read(tmp_path, mnist_png_bytes, capsys):
    digit, absent = tmp_path / "digit.png", tmp_path / "absent-ca.pem"
    digit.write_bytes(mnist_png_bytes[0][0])
    assert predict.main(["--protocol", "grpc", "--ca", str(absent), "--server", "127.0.0.1:1",
                         str(digit)]) == predict.EXIT_USAGE
    assert f"cannot read the CA certificates file {absent}" in capsys.readouterr().err
