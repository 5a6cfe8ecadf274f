"""How the CLI prints each command's payload for a person (`--json` prints the payload
itself)."""

from __future__ import annotations

import time


def job(result: dict) -> str:
    lines = [f"registered {result['model']} version {result['version']} as @{result['alias']} "
             f"(run {result['run_id']}, {result['seconds']} s)"]
    for holdout, metrics in result["metrics"].items():
        shown = {k: v for k, v in metrics.items() if k in (
            "macro_f1", "accuracy", "ece", "ece_uncalibrated", "temperature", "loss", "perplexity",
            "exact_match", "latency_p50_ms")}
        lines.append(f"  {holdout:14} " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return "\n".join(lines)


def distilled(p: dict) -> str:
    verdict = "aliased @fallback" if p["gate"]["promote"] else "not aliased: the gate refused it"
    lines = job({**p, "alias": None}).splitlines()
    lines[0] = (f"registered the student {p['model']} version {p['version']} of champion "
                f"v{p['teacher']}, {verdict} (run {p['run_id']}, {p['seconds']} s)")
    return "\n".join(lines + [f"  gate: {p['gate']['reason']}"])


def lineage(p: dict, indent: str = "") -> str:
    def data(d: dict) -> str:
        rows = f", {d['rows']} rows" if d.get("rows") is not None else ""
        what = f": {d['description']}" if d.get("description") else ""
        return f"{d['name']} ({d['namespace']}{rows}{what})"

    lines = [f"{indent}{p['model']}"]
    run = p["trained_by"]
    if run is None:
        lines.append(f"{indent}  trained by: no lineage event (registered before lineage, or "
                     "elsewhere)")
    else:
        lines.append(f"{indent}  trained by {run['job']} run {run['run']} ({run['state']}, "
                     f"{run['started']} -> {run['ended']})")
        lines += [f"{indent}    input {data(d)}" for d in run["inputs"]]
    if p["retrain"]:
        r = p["retrain"]
        lines.append(f"{indent}  within {r['job']} run {r['run']}: {r.get('description') or ''}")
        lines += [f"{indent}    input {data(d)}" for d in r.get("inputs", [])]
    lines += [f"{indent}  deployed {d['at']} to {', '.join(d['deployments'])} ({d['why']})"
              for d in p["deployed"]]
    if "served" in p:
        s = p["served"]
        lines.append(f"{indent}  served {s['requests']} logged requests"
                     + (f" ({s['first']} -> {s['last']})" if s["requests"] else ""))
    for parent in p["from"]:
        lines.append(f"{indent}  fine-tuned from:")
        lines.append(lineage(parent, indent + "    "))
    return "\n".join(lines)


def state(p: dict) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(p["since"]))
    line = (f"{p['model']}: {p['state']} since {since}; champion v{p['champion']}"
            + (f", challenger v{p['challenger']}" if p.get("challenger") else ""))
    waiting = p.get("detail", {}).get("waiting")
    return line + (f" (waiting: {waiting})" if waiting else "")


def events(moves: list[dict]) -> list[str]:
    return [f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['from']} -> {e['to']}: "
            f"{e['reason']}" for e in moves]


def status(payload: dict) -> str:
    lines = []
    for app, a in payload["applications"].items():
        lines.append(f"{app:11} {a['status']:10} {a['route_prefix']}")
        for dep, d in a["deployments"].items():
            replicas = " ".join(f"{n} {s.lower()}" for s, n in d["replicas"].items()) or "0"
            model = f"{d['model']} (@{d['alias']})" if d["alias"] else (d["model"] or "")
            canary = d.get("canary")
            if canary:
                mode = "shadow" if canary["shadow"] else f"{canary['fraction']:.0%}"
                model += f" + canary {canary['model']} {mode}"
            if d.get("adapters"):
                model += " + adapters " + ", ".join(f"{name}={ad['model']}"
                                                    for name, ad in d["adapters"].items())
            if d.get("fallback"):
                model += f" + peak fallback {d['fallback']['model']}"
            if d.get("inline_in"):
                model += f" (inline in {d['inline_in']})"
            lines.append(f"  {dep:20} {d['status']:9} {replicas:12} {model}")
    for model, c in payload.get("controllers", {}).items():
        state = c["state"]["state"] if c["state"] else "no state yet"
        lines.append(f"controller {model}: {state}" + ("" if c["running"] else " (not running)"))
    if "monitor" in payload:
        m = payload["monitor"]
        lines.append(f"monitor: {m['metrics']}" if m["running"] else
                     f"monitor: not running{': ' + m['error'] if m.get('error') else ''}")
    return "\n".join(lines + [f"http: {payload['url']}"]) if lines else "no applications"


def change(p: dict) -> str:
    what = f"now serving {p['serving']}" if "serving" in p else "canary updated"
    return f"{p['model']}: {what} on {', '.join(p['deployments'])} ({p['seconds']} s)"


def down(p: dict) -> str:
    controllers = p["controllers_stopped"]
    return (("removed the Serve applications; " if p["applications_removed"] else
             "no Serve running; ")
            + (f"stopped the controllers of {', '.join(controllers)}; " if controllers else "")
            + ("stopped the monitor; " if p["monitor_stopped"] else "")
            + ("stopped the local Ray head" if p["ray_stopped"] else
               "left Ray running (not started by llmops up)"))


def models(payload: dict) -> str:
    lines = []
    for m in payload["models"]:
        lines.append(m["name"])
        for v in m["versions"]:
            tag = ",".join("@" + a for a in v["aliases"]) or "-"
            shown = " ".join(f"{k} {x:.3f}" for k, x in sorted(v["metrics"].items())[:4])
            lines.append(f"  v{v['version']:<3} {tag:22} {shown}")
    return "\n".join(lines) or "no registered models"


def drift(payload: dict) -> str:
    verdict = "DRIFT" if payload["drift"] else "no drift"
    lines = [f"{payload['model']} v{payload['version']}: {verdict} ({payload['drifted_windows']}"
             f" of the last {len(payload['windows'])} windows drifted; policy {payload['k']} "
             f"of {payload['n']})"]
    for w in payload["windows"]:
        shown = "  ".join(f"{m['name']} {m['value']:g}{'!' if m['drifted'] else ''}"
                          for m in w["metrics"])
        lines.append(f"  {w['end'][:19]} {w['rows']:>5} rows  {shown}")
    if payload["windows"][-1]["html"]:
        lines.append(f"report: {payload['windows'][-1]['html']}")
    return "\n".join(lines)


def health(payload: dict) -> str:
    lines = []
    for r in payload["results"]:
        lines.append(f"{r['model']} v{r['version']}: "
                     f"{'healthy' if r['healthy'] else 'DEGRADED'}"
                     + (f" ({r['error']})" if r["error"] else ""))
        lines += [f"  {c['name']:15} {c['value']:>10g}  registered {c['baseline']:g}  "
                  f"limit {c['limit']:g}{'' if c['ok'] else '  !'}" for c in r["checks"]]
    return "\n".join(lines + [f"metrics: {payload['textfile']}"])


def controllers(payload: dict) -> str:
    lines = []
    for model, p in payload.items():
        shown = state(p["state"]) if p["state"] else f"{model}: no state yet"
        lines.append(shown + ("" if p["running"] else "  [controller not running]"))
        lines += events(p["events"])
    return "\n".join(lines)


def audit(p: dict) -> str:
    if p["ok"]:
        return f"audit chain intact: {p['records']} records in {p['files']} files"
    bad = p["first_bad"]
    return f"audit chain BROKEN at {bad['file']} line {bad['line']}: {bad['reason']}"


def replay(p: dict) -> str:
    lines = [f"request {p['request_id']} ({p['ts']}): "
             f"{'figures MATCH' if p['match'] else 'figures DIFFER'}"]
    for t in p["tools"]:
        config = "" if t["same_config"] else " (the configuration changed since)"
        lines.append(f"  {t['tool']} seed {t['seed']}: {t['figures'] - len(t['differences'])} "
                     f"of {t['figures']} figures equal{config}")
        lines += [f"    {k}: recorded {d['recorded']}, now {d['replayed']}"
                  for k, d in t["differences"].items()]
    return "\n".join(lines)


def demo(p: dict) -> str:
    metric = "macro_f1" if "macro_f1" in p else "token_f1"  # a generator's
    f1, at = p[metric], p["seconds_after_drift_onset"]
    drifted = ", ".join(f"{v} {x:.3f}" for v, x in f1["drifted_traffic"].items())
    return "\n".join([
        f"{p['model']}: {p['outcome']} (champion v{p['old_champion']} -> v{p['new_champion']})",
        f"{metric.replace('_', '-')}: {f1['clean_traffic_before_drift']:.3f} on clean traffic "
        f"before the drift; "
        f"on {p['scenario']} traffic {drifted} ({f1['recovered']:.0%} recovered)",
        f"requests served {p['requests_served']}, failed {p['requests_failed']}",
        "after the drift began: " + ", ".join(
            f"{k.replace('_', ' ')} {v} s" for k, v in at.items() if v is not None),
        f"the demo took {p['seconds_total'] / 60:.1f} min",
        *[f"{k}: {v}" for k, v in p["where_to_look"].items()]])


def capacity(p: dict) -> str:
    return "\n".join(f"{r['who']:36} x{r['count']:<3} {r['resources']} -> "
                     f"{', '.join(r['node_types'])}" for r in p["requests"])
