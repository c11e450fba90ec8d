"""The ``mwm`` command line."""

from __future__ import annotations

import typer

from wm.cli import bus

app = typer.Typer(
    name="mwm",
    help="MWM: workload manager for medical-imaging AI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("consume")(bus.consume)
app.command("run")(bus.run_all)
app.add_typer(bus.topology_app, name="topology")
app.add_typer(bus.dlq_app, name="dlq")


def main() -> None:
    """Entry point of the ``mwm`` console script."""
    app()
