"""The `edgekd` command: each command parses options, calls one library function, renders.

Human output goes to stderr; `--json` puts machine output alone on stdout. One module per command group
lists its commands in ``COMMANDS``; they are registered on the shared app here, in the order `--help` shows.
"""

from edgekd.cli import bench, export, package, run, train
from edgekd.cli.common import app

for _group in (run, train, export, bench, package):
    for _name, _command in _group.COMMANDS.items():
        app.command(_name)(_command)


def main() -> None:
    app()


__all__ = ["app", "main"]
