"""`certrotator agent`: run the device agent, standalone (`--config device.toml`) or as the Greengrass
component (`--greengrass --root {kernel:rootPath}`). Register with `app.command("agent")(agent)`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from certrotator.algorithms import CryptoError
from certrotator.console import fail
from certrotator.device.keystores.base import KeyStoreError
from certrotator.device.settings import ConfigError
from certrotator.device.startup import STARTUP_FAILED_EXIT_CODE


def agent(
    config: Annotated[
        Path | None, typer.Option("--config", help="Standalone mode: the device.toml to run with")
    ] = None,
    greengrass: Annotated[
        bool, typer.Option("--greengrass", help="Greengrass mode: run as the rotator component")
    ] = False,
    root: Annotated[
        Path | None, typer.Option("--root", help="Greengrass mode: the Greengrass root, {kernel:rootPath}")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option("--work", help="Greengrass mode: where the journal is kept, {work:path} (default: cwd)"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False,
) -> None:
    """Run the rotation agent until stopped. In Greengrass mode it exits with code 75 when the
    Greengrass service must restart to use changed credentials (the recipe does that). It exits with
    69 when its credentials could not be made ready at start-up (after retrying failures that may
    pass, e.g. a busy PKCS#11 token), with 70 after an unexpected error, and with 2 for an invalid
    configuration: a service manager restarts it."""
    if greengrass == (config is not None):
        raise fail("give exactly one of --config FILE (standalone) or --greengrass (component)")
    if greengrass and root is None:
        raise fail("--greengrass needs --root (the recipe passes {kernel:rootPath})")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = 0
    try:
        if config is not None:
            from certrotator.device.standalone import runtime as standalone

            try:
                standalone.run(config)
            except standalone.AgentFailed as exc:
                raise fail(f"agent stopped: {exc}", exc.exit_code) from None
        else:
            assert root is not None
            from certrotator.device.greengrass import runtime as greengrass_mode

            code = greengrass_mode.run(root, work)
    except (ConfigError, CryptoError) as exc:
        raise fail(f"invalid configuration: {exc}") from None
    except KeyStoreError as exc:
        raise fail(f"cannot open the key store: {exc}", STARTUP_FAILED_EXIT_CODE) from None
    except ImportError as exc:
        raise fail(f"{exc}; install the device extra: pip install 'certrotator[device]'") from None
    raise typer.Exit(code)
