"""Bearer-token verification: the auth matrix (no token, expired, not yet valid, wrong
signature, audience or issuer, `alg: none`, HS/RS confusion, missing scope), RS256 and a JWKS
key, the development secret and `llmops token create`."""

import base64
import hashlib
import hmac
import json
import stat
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from serve_apps.auth import Forbidden, Unauthorized, Verifier, ensure_secret, issue, secret_path
from serve_apps.policy_config import AuthConfig


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_signed(header: dict, claims: dict, key: bytes | None) -> str:
    """A token built by hand (what an attacker can send), HMAC-SHA256-signed with `key`, or
    unsigned when `key` is None."""
    head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = _b64(hmac.new(key, head.encode(), hashlib.sha256).digest()) if key else ""
    return f"{head}.{sig}"


def _claims(**changes) -> dict:
    now = int(time.time())
    return {"iss": "llmops", "aud": "llmops", "sub": "alice", "tenant": "acme",
            "scope": "support feedback", "iat": now, "nbf": now, "exp": now + 600} | changes


@pytest.fixture
def hs(tmp_path) -> tuple[Verifier, bytes]:
    config = AuthConfig()
    return Verifier(config, tmp_path), ensure_secret(secret_path(config, tmp_path))


@pytest.fixture
def rsa_key(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "public.pem").write_bytes(pem)
    return key, pem


def test_a_valid_token_gives_the_principal_and_its_scopes(hs):
    verifier, secret = hs
    principal = verifier.verify("Bearer " + jwt.encode(_claims(), secret, algorithm="HS256"))
    assert (principal.subject, principal.tenant) == ("alice", "acme")
    assert principal.scopes == {"support", "feedback"}
    principal.require("support")
    with pytest.raises(Forbidden, match="lacks the 'moderate' scope .it has: feedback, support"):
        principal.require("moderate")


# claims made when the test runs, not when it is collected (the suite takes minutes)
@pytest.mark.parametrize("claims, key, message", [
    (lambda: _claims(exp=int(time.time()) - 120), None, "expired"),
    (lambda: _claims(nbf=int(time.time()) + 120), None, "not valid yet"),
    (lambda: _claims(aud="someone-else"), None, "audience"),
    (lambda: _claims(iss="evil"), None, "not issued by llmops"),
    (_claims, b"not-the-secret", "signature does not verify"),
    (lambda: _claims(tenant=""), None, "names no tenant"),
    (lambda: {k: v for k, v in _claims().items() if k != "exp"}, None, "exp"),
], ids=["expired", "not-yet-valid", "audience", "issuer", "signature", "no-tenant", "no-exp"])
def test_bad_tokens_are_refused_with_the_reason(hs, claims, key, message):
    verifier, secret = hs
    token = jwt.encode(claims(), key or secret, algorithm="HS256")
    with pytest.raises(Unauthorized, match=message) as refused:
        verifier.verify(f"Bearer {token}")
    assert refused.value.status == 401
    assert refused.value.headers["WWW-Authenticate"].startswith('Bearer realm="llmops", '
                                                               'error="invalid_token"')


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer abc.def"])
def test_a_missing_or_malformed_header_is_refused(hs, header):
    with pytest.raises(Unauthorized):
        hs[0].verify(header)


def test_alg_none_is_refused_even_with_valid_claims(hs):
    token = _hand_signed({"alg": "none", "typ": "JWT"}, _claims(), None)
    with pytest.raises(Unauthorized, match="'none' are not accepted"):
        hs[0].verify(f"Bearer {token}")


def test_rs256_tokens_verify_and_hs_rs_confusion_is_refused(tmp_path, rsa_key):
    key, pem = rsa_key
    rs_only = Verifier(AuthConfig(algorithms=["RS256"], public_key_file=str(tmp_path /
                                                                           "public.pem")), tmp_path)
    assert rs_only.verify("Bearer " + jwt.encode(_claims(), key, algorithm="RS256")).tenant == \
        "acme"
    # the classic attack: an HS256 token whose HMAC secret is the server's public key
    forged = _hand_signed({"alg": "HS256", "typ": "JWT"}, _claims(scope="admin"), pem)
    with pytest.raises(Unauthorized, match="'HS256' are not accepted"):
        rs_only.verify(f"Bearer {forged}")
    both = Verifier(AuthConfig(algorithms=["HS256", "RS256"],
                               public_key_file=str(tmp_path / "public.pem")), tmp_path)
    with pytest.raises(Unauthorized, match="signature does not verify"):
        both.verify(f"Bearer {forged}")  # HS* tokens are checked with the secret, never the key


def test_jwks_keys_are_chosen_by_kid(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": "k1",
                                                                             "use": "sig"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    verifier = Verifier(AuthConfig(algorithms=["ES256"], jwks_file=str(tmp_path / "jwks.json")),
                        tmp_path)
    token = jwt.encode(_claims(), key, algorithm="ES256", headers={"kid": "k1"})
    assert verifier.verify(f"Bearer {token}").subject == "alice"
    other = jwt.encode(_claims(), key, algorithm="ES256", headers={"kid": "k2"})
    with pytest.raises(Unauthorized, match="no key 'k2'"):
        verifier.verify(f"Bearer {other}")


def test_development_tokens_use_a_private_secret(tmp_path):
    config = AuthConfig(default_ttl_s=60)
    token = issue(config, tmp_path, tenant="acme", scopes=["moderate"])
    path = secret_path(config, tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = Verifier(config, tmp_path).verify(f"Bearer {token}")
    assert (principal.tenant, principal.scopes) == ("acme", {"moderate"})
    assert jwt.decode(token, options={"verify_signature": False})["exp"] - time.time() <= 60


def _llmops(data_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)


def test_token_create_command(tmp_path):
    made = _llmops(tmp_path, "token", "create", "--tenant", "acme", "--scopes", "support", "chat",
                   "--ttl", "120", "--json")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    principal = Verifier(AuthConfig(), tmp_path).verify(f"Bearer {out['token']}")
    assert principal.scopes == {"support", "chat"} and out["expires_in_s"] == 120
    bad = _llmops(tmp_path, "token", "create", "--tenant", "acme", "--scopes", "root")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "llmops: error: unknown scope root (scopes: moderate, support, chat, feedback, advise, admin)")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\n\n", "is empty"), (b"short-secret\n", "fewer than 32 bytes"),
    (b"x" * 40 + b"\nshort\n", "line 2"),
])
def test_an_empty_or_short_secret_is_refused(tmp_path, content, message):
    from serve_apps.auth import WeakSecret

    (tmp_path / "secret").write_bytes(content)
    config = AuthConfig(secret_file=str(tmp_path / "secret"))
    with pytest.raises(WeakSecret, match=message):
        Verifier(config, tmp_path)
    with pytest.raises(WeakSecret, match=message):
        issue(config, tmp_path, tenant="acme", scopes=["chat"])


def test_a_rotated_secret_takes_effect_without_a_restart(tmp_path):
    """New secret first, old one second: tokens of both verify, new ones are signed with the
    new; once the old line is removed its tokens are refused. Nothing is restarted."""
    path = tmp_path / "secret"
    path.write_bytes(b"a" * 32)
    config = AuthConfig(secret_file=str(path))
    verifier = Verifier(config, tmp_path, reload_every_s=0)
    old = issue(config, tmp_path, tenant="acme", scopes=["chat"])
    path.write_bytes(b"b" * 40 + b"\n" + b"a" * 32 + b"\n")
    new = issue(config, tmp_path, tenant="acme", scopes=["chat"])
    assert jwt.decode(new, b"b" * 40, algorithms=["HS256"], audience="llmops")["tenant"] == "acme"
    assert verifier.verify(f"Bearer {old}").tenant == verifier.verify(f"Bearer {new}").tenant
    path.write_bytes(b"b" * 40 + b"\n")
    with pytest.raises(Unauthorized, match="signature does not verify"):
        verifier.verify(f"Bearer {old}")
    path.write_bytes(b"")  # a broken rotation keeps the secrets held, with an error logged
    assert verifier.verify(f"Bearer {new}").tenant == "acme"


def test_a_token_whose_header_holds_any_text_gets_a_latin1_challenge(hs):
    verifier, _ = hs
    header = _b64(json.dumps({"alg": "H\u015a256\r\n", "typ": "JWT"}, ensure_ascii=False)
                  .encode())
    with pytest.raises(Unauthorized) as refused:
        verifier.verify(f"Bearer {header}.e30.c2ln")
    refused.value.headers["WWW-Authenticate"].encode("latin-1")  # a valid header value
    assert "\r" not in refused.value.headers["WWW-Authenticate"]
