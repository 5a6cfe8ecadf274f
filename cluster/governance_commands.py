"""The governance commands: development tokens and certificates, and the audit log's checks
(verify, export, replay)."""

from __future__ import annotations

from pathlib import Path

from cluster import views
from cluster.commands import Output, settings_of
from training.errors import LLMOpsError


def cmd_token_create(args) -> Output:
    from serve_apps.auth import issue, secret_path

    settings = settings_of(args)
    token = issue(settings.serve.auth, settings.data_dir, tenant=args.tenant, scopes=args.scopes,
                  subject=args.subject, ttl_s=args.ttl)
    payload = {"token": token, "tenant": args.tenant, "scopes": args.scopes,
               "expires_in_s": args.ttl or settings.serve.auth.default_ttl_s,
               "secret_file": str(secret_path(settings.serve.auth, settings.data_dir))}
    return Output(payload, lambda p: p["token"])


def cmd_tls_dev_cert(args) -> Output:
    from serve_apps.tls import dev_cert

    settings = settings_of(args)
    out = Path(args.out) if args.out else settings.data_dir / "tls"
    tls = dev_cert(out, args.host, args.days)
    return Output({"tls": tls, "days": args.days}, lambda p: "\n".join(
        ["serve:", "  tls:", *(f"    {k}: {v}" for k, v in p["tls"].items())]))


def cmd_audit_verify(args) -> Output:
    from monitoring.audit import anchor_path, verify

    settings = settings_of(args)
    result = verify(settings.audit_dir,
                    anchor_path(settings.audit_dir, settings.monitoring.audit)).to_dict()

    return Output(result, views.audit, exit_code=0 if result["ok"] else 1)


def _when(text: str | None):
    """An ISO 8601 time (UTC unless it says otherwise), or None."""
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise LLMOpsError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25 or "
                          f"2026-11-25T12:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_audit_export(args) -> None:
    from monitoring.audit import export

    for line in export(settings_of(args).audit_dir, _when(args.since), _when(args.until)):
        print(line)


def cmd_audit_replay(args) -> Output:
    from monitoring.audit import find
    from serve_apps.portfolio import replay

    settings = settings_of(args)
    record = find(settings.audit_dir, args.request_id)
    if record is None:
        raise LLMOpsError(f"no audit record of request {args.request_id!r} in "
                          f"{settings.audit_dir}")
    tools = [t for t in record.get("tools") or () if t.get("result") is not None]
    if not tools:
        raise LLMOpsError(f"request {args.request_id} ({record['application']}) has no tool "
                          f"result to replay (a call handed to the client is replayed from the "
                          f"request that returned its result)")
    results = [replay(tool, settings.serve.advisor.portfolio) for tool in tools]
    payload = {"request_id": args.request_id, "ts": record["ts"],
               "models": record["models"], "match": all(r["match"] for r in results),
               "tools": results}
    return Output(payload, views.replay, exit_code=0 if payload["match"] else 1)
