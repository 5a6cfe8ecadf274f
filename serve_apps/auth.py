"""OAuth2 bearer tokens: verifying a JWT into a `Principal` (who, which tenant, which scopes)
and issuing development tokens from a local secret.

A token is accepted only when its header names one of the configured algorithms and its
signature checks with the key that algorithm family uses (HS*: the shared secret; RS*/ES*: the
public key, or the JWKS key its `kid` names), and its `iss`, `aud`, `exp` and `nbf` hold with
`leeway_s` of clock skew. So `alg: none` and algorithm confusion (an HS256 token signed with an
RS256 public key as its secret) are refused before any signature is computed.

Claims read: `sub` (the principal), `tenant`, and `scope`, space-separated as in OAuth2.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from serve_apps.policy_config import AuthConfig
from training.errors import LLMOpsError

SCOPES = ("moderate", "support", "chat", "feedback", "advise", "admin")


class Unauthorized(LLMOpsError):
    """No token, or one that does not verify: 401 with a `WWW-Authenticate` challenge."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        # a header value is Latin-1 without controls: anything else a token brought is escaped
        reason = str(self).replace('"', "'").encode("ascii", "backslashreplace").decode()
        reason = "".join(c if c.isprintable() else "?" for c in reason)
        return {"WWW-Authenticate": f'Bearer realm="llmops", error="invalid_token", '
                                    f'error_description="{reason}"'}


class Forbidden(LLMOpsError):
    """A valid token without the scope the route needs: 403."""

    status = 403


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this token lacks the {scope!r} scope (it has: "
                            f"{', '.join(sorted(self.scopes)) or 'none'})")


def secret_path(config: AuthConfig, data_dir: Path) -> Path:
    return Path(config.secret_file) if config.secret_file else data_dir / "auth" / "jwt_secret"


MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash


class WeakSecret(LLMOpsError):
    """An HS* secret file that is empty or shorter than `MIN_SECRET_BYTES`."""


def read_secrets(path: Path) -> list[bytes]:
    """The HS* secrets of a secret file, one per line: the first signs new tokens, every one
    verifies (rotation: put the new secret first, remove the old one once its tokens expire)."""
    keys = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
    if not keys:
        raise WeakSecret(f"the JWT secret file {path} is empty: write a random secret of at "
                         f"least {MIN_SECRET_BYTES} bytes (or remove it to have one made)")
    short = [i + 1 for i, key in enumerate(keys) if len(key) < MIN_SECRET_BYTES]
    if short:
        raise WeakSecret(f"the JWT secret on line {short[0]} of {path} has fewer than "
                         f"{MIN_SECRET_BYTES} bytes: any token signed with it could be forged")
    return keys


def ensure_secret(path: Path) -> bytes:
    """The HS* signing secret, created on first use: 32 random bytes as hex, readable by the
    owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return read_secrets(path)[0]
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
    return read_secrets(path)[0]


class Verifier:
    """Checks bearer tokens against one `AuthConfig` (keys read once, at construction)."""

    def __init__(self, config: AuthConfig, data_dir: Path, reload_every_s: float = 5.0):
        import jwt

        self.config = config
        self.secret_file = secret_path(config, data_dir) \
            if any(a.startswith("HS") for a in config.algorithms) else None
        self.reload_every_s, self._checked, self._stamp = reload_every_s, 0.0, None
        if self.secret_file is not None:
            ensure_secret(self.secret_file)
            self._reload(time.monotonic())
        self.public_key = Path(config.public_key_file).read_text() \
            if config.public_key_file else None
        self.jwks = jwt.PyJWKSet.from_dict(json.loads(Path(config.jwks_file).read_text())) \
            if config.jwks_file else None

    def _reload(self, now: float) -> None:
        """Read the secret file again when it changed (rotation without a redeploy); a file
        made weak or empty meanwhile is refused and the secrets held so far stay."""
        self._checked = now
        stat = self.secret_file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self.secrets, self._stamp = read_secrets(self.secret_file), stamp

    def _hs_keys(self) -> list[bytes]:
        now = time.monotonic()
        if now - self._checked >= self.reload_every_s:
            try:
                self._reload(now)
            except (OSError, WeakSecret) as exc:
                import logging

                logging.getLogger(__name__).error("keeping the JWT secrets held: %s", exc)
        return self.secrets

    def _keys(self, header: dict) -> list:
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted (accepted: "
                               f"{', '.join(self.config.algorithms)})")
        if alg.startswith("HS"):
            return self._hs_keys()
        return [self._public_key(header, alg)]

    def _public_key(self, header: dict, alg: str):
        if self.jwks is not None and header.get("kid"):
            try:
                return self.jwks[header["kid"]].key
            except KeyError:
                raise Unauthorized(f"no key {header['kid']!r} in the JWKS") from None
        if self.public_key is None:
            raise Unauthorized(f"no public key is configured for {alg} tokens")
        return self.public_key

    def verify(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <jwt>` header value."""
        import jwt

        if not authorization:
            raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        try:
            header = jwt.get_unverified_header(token)
            claims = self._decode(token, header)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"the token is not for this audience ({self.config.audience})") \
                from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(f"the token was not issued by {self.config.issuer}") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is invalid: {exc}") from None
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized("the token names no tenant")
        scopes = claims.get("scope", "")
        return Principal(subject=str(claims["sub"]), tenant=tenant,
                         scopes=frozenset(scopes.split() if isinstance(scopes, str) else scopes))


    def _decode(self, token: str, header: dict) -> dict:
        """The claims, verified with the first key that checks (several during a rotation)."""
        import jwt

        keys = self._keys(header)
        for i, key in enumerate(keys):
            try:
                return jwt.decode(token, key, algorithms=[header["alg"]],
                                  audience=self.config.audience, issuer=self.config.issuer,
                                  leeway=self.config.leeway_s,
                                  options={"require": ["exp", "iss", "aud", "sub"],
                                           "enforce_minimum_key_length": True})
            except jwt.InvalidSignatureError:
                if i == len(keys) - 1:
                    raise
        raise jwt.InvalidSignatureError("no key")


def issue(config: AuthConfig, data_dir: Path, *, tenant: str, scopes: list[str],
          subject: str | None = None, ttl_s: int | None = None) -> str:
    """A development token signed with the local HS* secret."""
    import jwt

    hs = [a for a in config.algorithms if a.startswith("HS")]
    if not hs:
        raise LLMOpsError("development tokens are HS* tokens, and serve.auth.algorithms accepts "
                          "none: issue tokens from your identity provider")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise LLMOpsError(f"unknown scope {', '.join(unknown)} (scopes: {', '.join(SCOPES)})")
    if not tenant.strip():
        raise LLMOpsError("--tenant must not be empty")
    now = int(time.time())
    claims = {"iss": config.issuer, "aud": config.audience, "sub": subject or f"{tenant}-dev",
              "tenant": tenant, "scope": " ".join(scopes), "iat": now, "nbf": now,
              "exp": now + (ttl_s or config.default_ttl_s)}
    return jwt.encode(claims, ensure_secret(secret_path(config, data_dir)), algorithm=hs[0])
