"""The `certrotator` command line. Sub-command groups live beside the part they drive; this module only
assembles them, so `certrotator --help` stays fast and the device agent never imports the broker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from certrotator import crypto

app = typer.Typer(
    name="certrotator",
    help="Rotate the X.509 certificate and private key of AWS IoT devices, end to end.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def algorithms() -> None:
    """List the key and signing algorithms a rotation can use, by family."""
    table = Table(title="Algorithms")
    table.add_column("family")
    table.add_column("key algorithms")
    table.add_column("CSR signing algorithms")
    for family in crypto.Family:
        keys = ", ".join(a.value for a in crypto.KeyAlgorithm if a.family is family)
        signing = ", ".join(a.value for a in crypto.SigningAlgorithm if a.family is family)
        table.add_row(family.value, keys, signing)
    console.print(table)


@app.command("cert-id")
def cert_id(certificate: Annotated[Path, typer.Argument(help="PEM certificate file")]) -> None:
    """Print a certificate's AWS IoT id (SHA-256 of the DER certificate)."""
    try:
        console.print(crypto.certificate_id(certificate.read_bytes()))
    except (OSError, crypto.CryptoError) as exc:
        raise fail(f"{certificate}: {exc}") from None


@app.command("inspect-csr")
def inspect_csr(csr: Annotated[Path, typer.Argument(help="PEM CSR file")]) -> None:
    """Show a CSR's subject, key algorithm and whether its signature verifies."""
    try:
        info = crypto.inspect_csr(csr.read_bytes())
    except (OSError, crypto.CryptoError) as exc:
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
) -> None:
    """Rotate a fleet end to end on the embedded local IoT Core and verify every invariant."""
    from certrotator.device.config import ConfigError
    from certrotator.fleet.demo import DemoOptions, run_demo
    from certrotator.local.ca import IssuerName

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
        )
        code = run_demo(options, console)
    except (ConfigError, crypto.CryptoError, ValueError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def _register_groups() -> None:
    from certrotator.device.agent_cli import agent
    from certrotator.device.component_cli import component_app
    from certrotator.fleet.aws_cli import aws_app
    from certrotator.local.cli import jobs_app, local_app

    app.command("agent")(agent)
    app.add_typer(component_app, name="component")
    app.add_typer(aws_app, name="aws")
    app.add_typer(local_app, name="local")
    app.add_typer(jobs_app, name="jobs")


_register_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
