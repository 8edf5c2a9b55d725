"""Every kind of credential kapellmeister's settings take, against a real nats-server.

Each server below requires one kind; a service connects with `runtime.connect` from
`Settings` as read from the environment, uses JetStream, and the wrong credential is
refused: user/password, token, nkey seed file, creds file (operator mode, JWTs made
here with nkeys), and TLS with a client certificate (certificates made with openssl).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import nats.errors
import nkeys
import pytest
from nats.aio.client import Client

from kapellmeister.config import Settings
from kapellmeister.runtime import connect
from kapellmeister.server import EmbeddedServer


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(key: nkeys.KeyPair) -> str:
    return str(key.public_key.decode())


async def works(environ: dict[str, str]) -> None:
    """A service connects with these settings and stores and reads a message."""
    nc = await connect(Settings.from_env(environ), "credentials-test")
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="CHECK", subjects=["check"])
        ack = await js.publish("check", b"ok")
        assert (await js.get_msg("CHECK", ack.seq)).data == b"ok"
    finally:
        await nc.close()


async def refused(environ: dict[str, str]) -> None:
    settings = Settings.from_env(environ)
    nc = Client()
    try:
        with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
            await nc.connect(allow_reconnect=False, connect_timeout=3, **settings.connect_options())
    finally:
        await nc.close()  # a refused connect leaves its socket open otherwise


def server(tmp_path: Path, config: str) -> EmbeddedServer:
    path = tmp_path / "server.conf"
    path.write_text(f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n{config}\n')
    return EmbeddedServer(tmp_path, config_file=path)


async def test_user_and_password(tmp_path):
    config = "authorization { user: svc, password: pS3cret }"
    with server(tmp_path, config) as running:
        await works({"NATS_URL": running.url, "NATS_USER": "svc", "NATS_PASSWORD": "pS3cret"})
        await refused({"NATS_URL": running.url, "NATS_USER": "svc", "NATS_PASSWORD": "nope"})


async def test_token(tmp_path):
    with server(tmp_path, "authorization { token: tK3n }") as running:
        await works({"NATS_URL": running.url, "NATS_TOKEN": "tK3n"})
        await refused({"NATS_URL": running.url, "NATS_TOKEN": "other"})


async def test_nkey_seed_file(tmp_path):
    user, stranger = new_key(nkeys.PREFIX_BYTE_USER), new_key(nkeys.PREFIX_BYTE_USER)
    seed, other = tmp_path / "svc.nk", tmp_path / "stranger.nk"
    seed.write_bytes(user.seed)
    other.write_bytes(stranger.seed)
    config = f"authorization {{ users = [ {{ nkey: {public(user)} }} ] }}"
    with server(tmp_path, config) as running:
        await works({"NATS_URL": running.url, "NATS_NKEY": str(seed)})
        await refused({"NATS_URL": running.url, "NATS_NKEY": str(other)})


def jwt(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """A NATS JWT (v2): ed25519-nkey signed, ``jti`` the digest of the claims."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims = {"iat": int(time.time()), "iss": public(issuer), **claims}
    claims["jti"] = base64.b32encode(
        hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    ).decode()
    header = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{b64(signature)}"


def creds_file(path: Path, token: str, user: nkeys.KeyPair) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


async def test_creds_file_in_operator_mode(tmp_path):
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_key(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = jwt(
        {"sub": public(operator), "name": "op", "nats": {"type": "operator", "version": 2}},
        operator,
    )
    account_jwt = jwt(
        {
            "sub": public(account),
            "name": "app",
            "nats": {
                "type": "account",
                "version": 2,
                "limits": {**unlimited, "conn": -1, "leaf": -1, "wildcards": True, **jetstream},
            },
        },
        operator,
    )
    user_jwt = jwt(
        {
            "sub": public(user),
            "name": "svc",
            "nats": {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1},
        },
        account,
    )
    # JetStream in operator mode needs a system account.
    system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    system_jwt = jwt(
        {"sub": public(system), "name": "SYS", "nats": {"type": "account", "version": 2}},
        operator,
    )
    config = (
        f"operator: {operator_jwt}\nresolver: MEMORY\nsystem_account: {public(system)}\n"
        f"resolver_preload: {{ {public(account)}: {account_jwt}, {public(system)}: {system_jwt} }}"
    )
    creds = creds_file(tmp_path / "svc.creds", user_jwt, user)
    # Another user's JWT with this user's seed: the server's nonce check fails.
    stranger = new_key(nkeys.PREFIX_BYTE_USER)
    forged = creds_file(tmp_path / "forged.creds", user_jwt, stranger)
    with server(tmp_path, config) as running:
        await works({"NATS_URL": running.url, "NATS_CREDS": str(creds)})
        await refused({"NATS_URL": running.url, "NATS_CREDS": str(forged)})


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
async def test_tls_with_a_client_certificate(tmp_path):
    pki = make_pki(tmp_path / "pki")
    config = (
        "tls {\n"
        f'  cert_file: "{pki / "server.pem"}"\n  key_file: "{pki / "server.key"}"\n'
        f'  ca_file: "{pki / "ca.pem"}"\n  verify: true\n'
        "}"
    )
    with server(tmp_path, config) as running:
        url = running.url.replace("nats://", "tls://")
        tls = {"NATS_URL": url, "NATS_CA": str(pki / "ca.pem")}
        await works(
            {**tls, "NATS_CERT": str(pki / "client.pem"), "NATS_KEY": str(pki / "client.key")}
        )
        await refused(tls)  # verify: a client without a certificate is refused


def make_pki(into: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl."""
    into.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=into, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (into / f"{name}.ext").write_text(extension + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem")  # fmt: skip
    return into
