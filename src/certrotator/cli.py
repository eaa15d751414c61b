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


def _register_groups() -> None:
    from certrotator.local.cli import jobs_app, local_app

    app.add_typer(local_app, name="local")
    app.add_typer(jobs_app, name="jobs")


_register_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
