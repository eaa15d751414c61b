"""The `certrotator` command line. Sub-command groups live beside the part they drive; this module only
assembles them, so `certrotator --help` stays fast and the device agent never imports the broker."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.table import Table
from typer import _click as click
from typer.core import TyperGroup

from certrotator import algorithms as tables  # not certrotator.crypto: `cryptography` loads lazily
from certrotator.console import fail

# Sub-command groups, imported only when their command runs (or for --help): `certrotator agent` runs on
# devices and must not load the local IoT Core's, Greengrass's or the AWS operator's modules (~0.1 s
# and several MB of imports on every agent start).
_LAZY_GROUPS: dict[str, tuple[str, str]] = {
    "component": ("certrotator.ops.component.cli", "component_app"),
    "aws": ("certrotator.ops.aws.cli", "aws_app"),
    "local": ("certrotator.local_cli", "local_app"),
    "jobs": ("certrotator.local_cli", "jobs_app"),
}
# Single commands, the same way: (module, function with typer annotations).
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "reconcile": ("certrotator.ops.reconcile.cli", "reconcile_command"),
    "schedule": ("certrotator.ops.schedule.cli", "schedule_command"),
    "report": ("certrotator.ops.report.cli", "report_command"),
}


class _LazyGroups(TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [*_LAZY_GROUPS, *_LAZY_COMMANDS]
        return [*super().list_commands(ctx), *(n for n in lazy if n not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_GROUPS and cmd_name not in self.commands:
            module, attribute = _LAZY_GROUPS[cmd_name]
            group = typer.main.get_group(getattr(importlib.import_module(module), attribute))
            group.name = cmd_name
            self.add_command(group, cmd_name)
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module, attribute = _LAZY_COMMANDS[cmd_name]
            single = typer.Typer(add_completion=False)
            single.command(cmd_name)(getattr(importlib.import_module(module), attribute))
            self.add_command(typer.main.get_command(single), cmd_name)
        return super().get_command(ctx, cmd_name)


class _Cli(typer.Typer):
    """`certrotator agent ...` runs without typer's parameter machinery, which imports pydantic (~15 MB
    and ~0.2 s) on every invocation; the agent runs on devices. Anything the fast path does not parse
    exactly (help, unknown or malformed options) goes through typer as before, and so do tests, which
    invoke the click command rather than calling the app."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and (code := _agent_fast_path(sys.argv[1:])) is not None:
            raise SystemExit(code)
        return super().__call__(*args, **kwargs)


def _agent_fast_path(argv: list[str]) -> int | None:
    """Run `agent` with exactly the options typer would accept; None to let typer handle argv."""
    if not argv or argv[0] != "agent" or any(a in ("--help", "-h") for a in argv):
        return None
    parser = argparse.ArgumentParser(prog="certrotator agent", add_help=False, exit_on_error=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--greengrass", action="store_true")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--verbose", "-v", action="store_true")
    try:
        options, extra = parser.parse_known_args(argv[1:])
    except (argparse.ArgumentError, SystemExit):
        return None
    if extra:
        return None
    from certrotator.device.agent_cli import agent

    try:
        agent(options.config, options.greengrass, options.root, options.work, options.verbose)
    except typer.Exit as done:
        return int(done.exit_code)
    return 0


app = _Cli(
    name="certrotator",
    help="Rotate the X.509 certificate and private key of AWS IoT devices, end to end.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_LazyGroups,
)
console = Console()


@app.command()
def algorithms() -> None:
    """List the key and signing algorithms a rotation can use, by family."""
    table = Table(title="Algorithms")
    table.add_column("family")
    table.add_column("key algorithms")
    table.add_column("CSR signing algorithms")
    for family in tables.Family:
        keys = ", ".join(a.value for a in tables.KeyAlgorithm if a.family is family)
        signing = ", ".join(a.value for a in tables.SigningAlgorithm if a.family is family)
        table.add_row(family.value, keys, signing)
    console.print(table)


@app.command("cert-id")
def cert_id(certificate: Annotated[Path, typer.Argument(help="PEM certificate file")]) -> None:
    """Print a certificate's AWS IoT id (SHA-256 of the DER certificate)."""
    from certrotator import crypto

    try:
        console.print(crypto.certificate_id(certificate.read_bytes()))
    except (OSError, tables.CryptoError) as exc:
        raise fail(f"{certificate}: {exc}") from None


@app.command("inspect-csr")
def inspect_csr(csr: Annotated[Path, typer.Argument(help="PEM CSR file")]) -> None:
    """Show a CSR's subject, key algorithm and whether its signature verifies."""
    from certrotator import crypto

    try:
        info = crypto.inspect_csr(csr.read_bytes())
    except (OSError, tables.CryptoError) as exc:
        raise fail(f"{csr}: {exc}") from None
    algorithm = crypto.key_algorithm_of(info.public_key)
    console.print(f"subject:   {info.subject.rfc4514_string()}")
    console.print(f"key:       {algorithm.value if algorithm else type(info.public_key).__name__}")
    console.print(f"signature: {'valid' if info.signature_valid else '[red]INVALID[/red]'}")
    violation = crypto.csr_key_policy_violation(info.public_key)
    console.print(f"policy:    {violation or 'allowed'}")
    if not info.signature_valid or violation:
        raise typer.Exit(1)


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="How many devices to provision and rotate.")] = 10,
    key_algorithm: Annotated[str, typer.Option(help="Key algorithm of the devices' keys.")] = "ECDSA-P256",
    signing_algorithm: Annotated[
        str | None, typer.Option(help="CSR signing algorithm (default: SHA-256 of the key's family).")
    ] = None,
    issuer: Annotated[str, typer.Option(help="iot (AWS IoT style) or private-ca.")] = "iot",
    ca_signing_algorithm: Annotated[
        str, typer.Option(help="Private CA signing algorithm.")
    ] = "SHA256WITHECDSA",
    keystore: Annotated[
        str, typer.Option(help="Where device keys live: file, or pkcs11 (SoftHSM2 tokens).")
    ] = "file",
    data_dir: Annotated[Path | None, typer.Option(help="Keep everything here (default: a temp dir).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            help="Run the local IoT Core in this process (default); --no-in-process gives it its own "
            "process, which uses both cores (faster for big fleets)."
        ),
    ] = True,
    max_in_flight: Annotated[
        int | None,
        typer.Option(
            help="The local IoT Core's admission limit: rotations at once (0 = no limit; default: as "
            "`certrotator local up`).",
            min=0,
        ),
    ] = None,
) -> None:
    """Rotate a fleet end to end on the embedded local IoT Core and verify every invariant."""
    from certrotator.device.settings import ConfigError
    from certrotator.local.ca import IssuerName
    from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT
    from certrotator.sim.demo import DemoOptions, run_demo

    try:
        options = DemoOptions(
            devices,
            key_algorithm,
            signing_algorithm,
            IssuerName(issuer),
            ca_signing_algorithm,
            keystore=keystore,
            data_dir=data_dir,
            as_json=as_json,
            in_process=in_process,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
        )
        code = run_demo(options, console)
    except (ConfigError, tables.CryptoError, ValueError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def _register_commands() -> None:
    from certrotator.device.agent_cli import agent  # light: the agent's own imports only

    app.command("agent")(agent)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
