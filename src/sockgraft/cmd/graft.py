"""`graft`: endpoint tables and `graft run`. The command line is the contract in DESIGN.md."""
from __future__ import annotations

import json
import os
import sys

import click

from sockgraft.host import netns
from sockgraft.core.endpoint import SpecError, check_name, parse_endpoint
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host.store import Store, StoreError

MODES = ("api", "preload", "seccomp")


def _container(ctx: click.Context) -> netns.Container:
    return netns.resolve(ctx.obj["netns"], ctx.obj["pid"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-n", "--netns", "netns_name", metavar="NETNS", help="Container by iproute2 netns name.")
@click.option("--pid", type=int, metavar="PID", help="Container by the netns of a process.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, netns_name: str | None, pid: int | None) -> None:
    """Socket grafting for containers: per-container tables of named host endpoints."""
    ctx.obj = {"json": as_json, "netns": netns_name, "pid": pid}


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def add(ctx: click.Context, words: tuple[str, ...]) -> None:
    """add NAME type ipv4|ipv6 addr ADDR port PORT|dynamic  |  add NAME type unix path PATH"""
    ep = parse_endpoint(list(words))
    c = _container(ctx)
    with Store() as store:
        store.add(c.key, ep, c.ino)
    if ctx.obj["json"]:
        click.echo(json.dumps(ep.to_json()))


@cli.command(name="del")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete endpoint NAME from the container's table."""
    check_name(name)
    c = _container(ctx)
    with Store() as store:
        store.delete(c.key, name)


@cli.command()
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print the container's table, one `ip graft` line per endpoint."""
    c = _container(ctx)
    with Store() as store:
        eps = store.endpoints(c.key)
    if ctx.obj["json"]:
        click.echo(json.dumps([ep.to_json() for ep in eps]))
    else:
        for ep in eps:
            click.echo(ep.line())


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("-n", "--netns", "netns_name", metavar="NETNS", help="Container netns (created if missing).")
@click.option("--mode", type=click.Choice(MODES), default="api", show_default=True)
@click.option("--ingress", multiple=True, metavar="ADDR:PORT[-PORT]=NAME", help="Graft binds of this address.")
@click.option("--egress", multiple=True, metavar="PREFIX/LEN=NAME", help="Graft connects to this prefix.")
@click.option("--endpoint", "endpoints", multiple=True, metavar="'NAME type ...'", help="Add this endpoint for the run.")
@click.option("--userns", is_flag=True, help="As root: run CMD as root of a user namespace (an unprivileged uid outside). Rootless runs always do.")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def run(ctx, netns_name, mode, ingress, egress, endpoints, userns, cmd) -> None:
    """Run CMD in a container netns with its sockets grafted; exits with CMD's status."""
    from sockgraft.cmd.run import run as run_cmd
    from sockgraft.modes.base import RunSpec

    spec = RunSpec(
        cmd=list(cmd),
        netns=netns_name or ctx.obj["netns"],
        mode=mode,
        endpoints=[parse_endpoint(e) for e in endpoints],
        ingress=[parse_ingress(p) for p in ingress],
        egress=[parse_egress(r) for r in egress],
        userns=userns,
    )
    if ctx.obj["pid"] is not None:
        raise SpecError("graft run takes -n NETNS, not --pid")
    ctx.exit(run_cmd(spec))


def _extensions() -> None:
    """Commands contributed by the other parts of the package."""
    from sockgraft.bench.cli import bench
    from sockgraft.cmd.config import config
    from sockgraft.cmd.status import status

    for command in (bench, config, status):
        cli.add_command(command)


_extensions()


def fail(message: str, code: int = 1) -> None:
    print(f"graft: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="graft", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        fail("aborted", 130)
    except click.ClickException as e:
        fail(e.format_message().replace("\n", " "), e.exit_code)
    except (SpecError, StoreError) as e:
        fail(str(e))
    except OSError as e:
        fail(str(e) if not e.strerror else f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # never a traceback for the user; GRAFT_DEBUG=1 shows it
        if os.environ.get("GRAFT_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e}", 70)
    sys.exit(rv if isinstance(rv, int) else 0)
