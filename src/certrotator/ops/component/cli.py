"""`certrotator component build`: the Greengrass component's artifact and recipe (GDK custom build)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from certrotator.console import fail
from certrotator.ops.component.build import (
    DEFAULT_COMPONENT_NAME,
    DEFAULT_PUBLISHER,
    BuildError,
    build_component,
    find_project_root,
    read_gdk_config,
)

component_app = typer.Typer(no_args_is_help=True)
console = Console()


# A callback keeps this a command group even with one command: `certrotator component build`.
@component_app.callback()
def component() -> None:
    """Build the Greengrass component."""


@component_app.command("build")
def build(
    version: Annotated[
        str | None, typer.Option(help="Component version (default: gdk-config.json, else the package's)")
    ] = None,
    bucket: Annotated[
        str | None,
        typer.Option(
            help="S3 bucket of the artifact (default: leave {BUCKET_NAME} for `gdk component publish`)"
        ),
    ] = None,
    region: Annotated[
        str | None, typer.Option(help="AWS region to publish in (default: gdk-config.json)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory, as GDK expects it")] = Path("greengrass-build"),
    name: Annotated[str | None, typer.Option(help="Component name (default: gdk-config.json)")] = None,
    project: Annotated[
        Path | None, typer.Option(help="certrotator source tree (default: found from the current directory)")
    ] = None,
) -> None:
    """Build greengrass-build/artifacts/<name>/<version>/certrotator.zip and greengrass-build/recipes/recipe.yaml."""
    try:
        root = project.resolve() if project else find_project_root(Path.cwd())
        # GDK runs a custom build in the directory of gdk-config.json; from elsewhere, use component/'s.
        gdk = read_gdk_config(Path.cwd() / "gdk-config.json") or read_gdk_config(
            root / "component" / "gdk-config.json"
        )
        result = build_component(
            root,
            out,
            name=name or (gdk.name if gdk else DEFAULT_COMPONENT_NAME),
            version=version or (gdk.version if gdk else None),
            bucket=bucket,
            region=region or (gdk.region if gdk else None),
            publisher=(gdk.author if gdk and gdk.author else DEFAULT_PUBLISHER),
        )
    except BuildError as exc:
        raise fail(str(exc)) from None
    console.print(f"component {result.name} {result.version}")
    console.print(f"  artifact: {result.artifact} ({result.wheel})")
    console.print(f"  recipe:   {result.recipe}")
    if result.bucket is None:
        console.print(
            "  artifact URI keeps {BUCKET_NAME}: publish with `gdk component publish`, or rebuild with --bucket"
        )
    else:
        console.print("publish with:")
        for command in result.publish_commands():
            console.print(f"  {command}", soft_wrap=True)
