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

from serve_apps.config import AuthConfig
from training.errors import LLMOpsError

SCOPES = ("moderate", "support", "chat", "feedback", "admin")


class Unauthorized(LLMOpsError):
    """No token, or one that does not verify: 401 with a `WWW-Authenticate` challenge."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        reason = str(self).replace('"', "'")
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


def ensure_secret(path: Path) -> bytes:
    """The HS* secret, created on first use: 32 random bytes as hex, readable by the owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
    return path.read_bytes()


class Verifier:
    """Checks bearer tokens against one `AuthConfig` (keys read once, at construction)."""

    def __init__(self, config: AuthConfig, data_dir: Path):
        import jwt

        self.config = config
        self.secret = ensure_secret(secret_path(config, data_dir)) \
            if any(a.startswith("HS") for a in config.algorithms) else None
        self.public_key = Path(config.public_key_file).read_text() \
            if config.public_key_file else None
        self.jwks = jwt.PyJWKSet.from_dict(json.loads(Path(config.jwks_file).read_text())) \
            if config.jwks_file else None

    def _key(self, header: dict):
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted (accepted: "
                               f"{', '.join(self.config.algorithms)})")
        if alg.startswith("HS"):
            return self.secret
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
            key = self._key(header)
            claims = jwt.decode(token, key, algorithms=[header["alg"]],
                                audience=self.config.audience, issuer=self.config.issuer,
                                leeway=self.config.leeway_s,
                                options={"require": ["exp", "iss", "aud", "sub"]})
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
