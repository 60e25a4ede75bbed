"""Entry point of the `heady` console script. Exit codes: 0 all good, 1 a role has no healthy
node, 2 bad input or an unusable answer (always one `heady: error: ...` line, no traceback)."""

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from heady_cli import batch, finetune, gateway, probe, secrets
from heady_cli.config import CliError, endpoints, load_vars, mask_url, resolve_gateway
from heady_shared.routes import ENDPOINT_PREFIX, NODE_COUNT

EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR = 0, 1, 2
STATE_STYLE = {"up": "green", "down": "red", "invalid": "red", "unconfigured": "yellow"}


def _console(stderr: bool = False) -> Console:
    file = sys.stderr if stderr else sys.stdout
    # Piped output (CI, `| less`) gets a wide fixed layout instead of 80 wrapped columns.
    width = None if file.isatty() else max(shutil.get_terminal_size((140, 24)).columns, 140)
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


def cmd_probe(args: argparse.Namespace) -> int:
    values = load_vars(args.dev_vars)
    token = values.get("NODE_TOKEN", "")
    if not token:
        raise CliError("NODE_TOKEN is not set (put it in .dev.vars or the environment)")
    raw = endpoints(values)
    if not raw:
        raise CliError(f"no {ENDPOINT_PREFIX}1..{NODE_COUNT} set (in .dev.vars or the environment)")
    setup = probe.read_setup(values)
    for problem in setup.problems:  # the gateway would use the default too
        print(f"heady: warning: {problem}", file=sys.stderr)
    targets, results = probe.plan(raw, setup.pools)

    if targets and not args.json:
        with Progress(
            SpinnerColumn(),
            TextColumn("probing nodes"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            console=_console(stderr=True),
            transient=True,
        ) as progress:
            task = progress.add_task("", total=len(targets))

            def done(r: probe.NodeResult) -> None:
                progress.update(task, advance=1, description=f"node {r.node} {r.state}")

            results += asyncio.run(probe.probe_all(targets, token, args.timeout, setup, done))
    elif targets:
        results += asyncio.run(probe.probe_all(targets, token, args.timeout, setup))
    results.sort(key=lambda r: r.node)
    missing = probe.uncovered_roles(results, setup.pools)

    if args.json:
        out = {
            "nodes": [r.as_dict(args.show_urls) for r in results],
            "uncovered_roles": missing,
        }
        print(json.dumps(out, indent=2))
    else:
        table = Table(title="Heady nodes (direct probe)")
        cols = ("node", "role", "state", "latency", "model", "queue", "serves", "endpoint")
        for col in (*cols, "reason"):
            table.add_column(col, overflow="fold")
        for r in results:
            url = r.url if args.show_urls or not r.url else mask_url(r.url)
            table.add_row(
                str(r.node),
                r.role or "-",
                f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]",
                "-" if r.latency_ms is None else f"{r.latency_ms:.0f} ms",
                r.model or "-",
                "-" if r.queue is None else str(r.queue),
                "-" if r.capabilities is None else ", ".join(r.capabilities) or "nothing",
                url or "-",
                r.reason or "",
            )
        console = _console()
        console.print(table)
        if missing:
            console.print(f"[red]No healthy node for role(s): {', '.join(missing)}[/]")
        else:
            console.print("[green]Every role has at least one healthy node.[/]")
    return EXIT_UNHEALTHY if missing else EXIT_OK


def cmd_secrets(args: argparse.Namespace) -> int:
    if args.node_credential is not None:
        secret = load_vars(args.dev_vars).get("NODE_SECRET", "")
        text = secrets.credential_json(secret, args.node_credential)
        return _emit(args, text, hint="set it as that node's secret (heady_node reads it)")
    urls: dict[int, str] = {}
    if args.file:
        try:
            urls.update(secrets.parse_file(Path(args.file).read_text()))
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    urls.update(secrets.parse_args_urls(args.urls))
    values: dict[str, str] = {}
    if not urls or args.with_token or args.with_node_secret:
        values = load_vars(args.dev_vars)
    if not urls:
        urls = endpoints(values)
    text = secrets.bulk_json(
        urls,
        values.get("NODE_TOKEN", "") if args.with_token else None,
        values.get("NODE_SECRET", "") if args.with_node_secret else None,
    )
    return _emit(args, text)


def _emit(args: argparse.Namespace, text: str, hint: str = "") -> int:
    if args.output:
        path = Path(args.output)
        try:
            path.touch(mode=0o600, exist_ok=True)
            path.write_text(text + "\n")
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
        if hint:
            print(f"wrote {path}; {hint}", file=sys.stderr)
        else:
            count = len(json.loads(text))
            print(f"wrote {count} secret(s) to {path}; upload with:", file=sys.stderr)
            print(f"  npx wrangler secret bulk {path}", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    base, key = resolve_gateway(args.gateway, args.key, args.dev_vars)
    st = gateway.fetch_status(base, key, args.timeout)
    missing = gateway.uncovered_roles(st)
    if args.json:
        print(json.dumps({"gateway": {"version": st.version}, "nodes": st.nodes,
                          "routes": st.routes, "uncovered_roles": missing}, indent=2))  # fmt: skip
        return EXIT_UNHEALTHY if missing else EXIT_OK
    table = Table(title=f"Heady gateway {st.version}: nodes as the gateway sees them")
    cols = ["node", "roles", "config", "state", "since", "latency", "load", "failures", "reason"]
    show_extra = any(gateway.extras(n) for n in st.nodes)
    for col in [*cols, "other"] if show_extra else cols:
        table.add_column(col, overflow="fold")
    for n in st.nodes:
        state = gateway.cell(n.get("state"))
        latency = n.get("latency_ms")
        row = [
            gateway.cell(n.get("node")),
            gateway.cell(n.get("roles")),
            gateway.cell(n.get("config")),
            f"[{STATE_STYLE.get(state, 'white')}]{state}[/]",
            gateway.cell(n.get("since")),
            f"{latency:.0f} ms" if isinstance(latency, int | float) else "-",
            gateway.cell(n.get("load")),
            gateway.cell(n.get("failures")),
            gateway.cell(n.get("reason") or n.get("config_reason")),
        ]
        table.add_row(*row, *([gateway.extras(n)] if show_extra else []))
    console = _console()
    console.print(table)
    if st.routes:
        routes = Table(title="Routes")
        for col in ("role", "pair", "fallback"):
            routes.add_column(col)
        for role, r in st.routes.items():
            r = r if isinstance(r, dict) else {}
            routes.add_row(role, gateway.cell(r.get("pair")), gateway.cell(r.get("fallback")))
        console.print(routes)
    if missing:
        console.print(f"[red]No available node for role(s): {', '.join(missing)}[/]")
    return EXIT_UNHEALTHY if missing else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heady", description="Operator tools for the Heady cluster.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("probe", help="check every Colab node directly")
    pr.add_argument("--dev-vars", help=f"file with {ENDPOINT_PREFIX}n and NODE_TOKEN (./.dev.vars)")
    pr.add_argument("--timeout", type=float, default=10.0, help="seconds per request (10)")
    pr.add_argument("--show-urls", action="store_true", help="print full endpoint URLs")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_probe)

    se = sub.add_parser("secrets", help="endpoint URLs -> JSON for `npx wrangler secret bulk`")
    se.add_argument("urls", nargs="*", metavar="N=URL", help="e.g. 3=https://x.ngrok-free.app")
    se.add_argument("--file", help=f"KEY=value file with {ENDPOINT_PREFIX}n lines")
    se.add_argument("--dev-vars", help="used when no URL is given (default ./.dev.vars)")
    se.add_argument("--with-token", action="store_true", help="include NODE_TOKEN as well")
    se.add_argument("--with-node-secret", action="store_true", help="include NODE_SECRET as well")
    se.add_argument(
        "--node-credential",
        type=int,
        metavar="N",
        help="instead: node N's HEADY_NODE_CREDENTIAL, derived from NODE_SECRET",
    )
    se.add_argument("-o", "--output", help="write the JSON here (mode 600) instead of stdout")
    se.set_defaults(func=cmd_secrets)

    st = sub.add_parser("status", help="the deployed gateway's view (/api/status)")
    st.add_argument("--gateway", help="gateway base URL (or HEADY_GATEWAY_URL)")
    st.add_argument("--key", help="gateway API key (prefer GATEWAY_API_KEY in the environment)")
    st.add_argument("--dev-vars", help="file with HEADY_GATEWAY_URL / GATEWAY_API_KEY")
    st.add_argument("--timeout", type=float, default=15.0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    batch.add_parser(sub)  # heady batch submit|watch|results|list|cancel (heady_cli/batch.py)
    finetune.add_parser(sub)  # heady finetune|ft create|watch|list|events|checkpoints|cancel
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"heady: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `heady probe --json | head`: the reader left, not our error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_OK
    except KeyboardInterrupt:
        print("heady: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # promise of the CLI: one line, never a traceback
        if os.environ.get("HEADY_DEBUG"):
            raise
        print(f"heady: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
