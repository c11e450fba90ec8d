"""The ``mwm`` command line."""

from __future__ import annotations

import typer

from wm.cli import api, bus, cleanup, export_client, exports, gateway, jobs, registry
from wm.console import run_command

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
app.command("api")(api.api)
app.add_typer(api.keys_app, name="keys")
app.add_typer(registry.apps_app, name="apps")
app.add_typer(registry.sinks_app, name="sinks")
app.add_typer(registry.aet_app, name="aet")
app.add_typer(jobs.jobs_app, name="jobs")
app.command("gateway")(gateway.gateway)
app.command("export-client")(export_client.export_client)
app.add_typer(exports.exports_app, name="exports")
app.command("cleanup")(cleanup.cleanup)


def main() -> None:
    """Entry point of the ``mwm`` console script (errors a person can act on end in one line)."""
    run_command(app)
