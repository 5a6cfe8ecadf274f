"""Typed configuration of the governance policies (`serve_apps/policies.py`): who may call
(`AuthConfig`), what is checked in and out (`GuardrailsConfig`), and each tenant's budget
(`QuotaConfig`). Part of the `serve:` section (`serve_apps/config.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]


class AuthConfig(StrictModel):
    """OAuth2 bearer JWTs (`serve_apps/auth.py`): which signatures are accepted and what a token
    must say. HS* tokens are checked with the shared secret, RS*/ES* ones with the public key or
    the JWKS file (by `kid`); a token signed with any other algorithm, `none` included, is
    refused."""

    algorithms: list[Algorithm] = Field(default_factory=lambda: ["HS256"], min_length=1)
    secret_file: str | None = Field(None, description="HS* secret; empty: "
                                    "<data_dir>/auth/jwt_secret, created with mode 0600")
    public_key_file: str | None = Field(None, description="PEM public key for RS*/ES*")
    jwks_file: str | None = Field(None, description="a JWKS document (keys chosen by kid)")
    issuer: str = "llmops"
    audience: str = "llmops"
    leeway_s: float = Field(30, ge=0, le=600, description="clock skew allowed on exp and nbf")
    default_ttl_s: int = Field(3600, ge=1, description="lifetime of `llmops token create` tokens")


class GuardrailRule(StrictModel):
    """One check of a text (`serve_apps/guardrails.py`) and what a hit does: `block` refuses the
    request (422), `redact` replaces what matched, `flag` only reports it."""

    name: str
    kind: Literal["denylist", "injection", "pii", "bias", "advice"]
    action: Literal["block", "redact", "flag"]
    patterns: list[str] = Field(default_factory=list, description="denylist: regular "
                                "expressions, matched case-insensitively")
    allow: list[str] = Field(default_factory=list, description="advice: regular expressions of "
                             "the products the firm may recommend; a request about one of them "
                             "is not a finding")

    @model_validator(mode="after")
    def _patterns(self) -> GuardrailRule:
        import re

        if self.kind == "denylist" and not self.patterns:
            raise ValueError(f"guardrail {self.name!r}: a denylist needs patterns")
        if self.allow and self.kind != "advice":
            raise ValueError(f"guardrail {self.name!r}: `allow` is for kind advice")
        for pattern in self.patterns + self.allow:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"guardrail {self.name!r}: bad pattern {pattern!r}: {exc}") \
                    from None
        return self


class GuardrailsConfig(StrictModel):
    """Rules run in the declared order on each input text before the models see it, and on each
    output text before it leaves."""

    input: list[GuardrailRule] = Field(default_factory=lambda: [
        GuardrailRule(name="prompt-injection", kind="injection", action="block")])
    output: list[GuardrailRule] = Field(default_factory=lambda: [
        GuardrailRule(name="personal-data", kind="pii", action="redact"),
        GuardrailRule(name="protected-attributes", kind="bias", action="flag")])


class TenantLimits(StrictModel):
    """A tenant's budgets (None: no limit). Days are UTC days."""

    requests_per_day: int | None = Field(100_000, ge=1)
    tokens_per_day: int | None = Field(20_000_000, ge=1, description="prompt plus generated")
    requests_per_second: float | None = Field(50, gt=0, description="sustained; bursts up to "
                                              "one second's worth")


class QuotaConfig(StrictModel):
    """Per-tenant quotas, kept by one authority (`serve_apps/quota.py`)."""

    default: TenantLimits = Field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict, description="per-tenant "
                                             "limits replacing the default")
    store: str | None = Field(None, description="the ledger file; empty: <data_dir>/quota.json")

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)
