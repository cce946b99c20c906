"""The `edgekd` command: each command parses options, builds a config, calls the library, renders.

Heavy modules (torch, the library) are imported inside commands so `edgekd --help` stays fast.
Human output goes to stderr; `--json` puts machine output alone on stdout. One module per
command group registers its commands on the shared app.
"""

from edgekd.cli import train, run, export, bench, package  # noqa: F401, I001 - importing registers the commands
from edgekd.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
