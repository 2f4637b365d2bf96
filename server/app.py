"""The Flower ServerApp: reads the run config Flower passes and runs the federation.

``flwr run .`` builds it from pyproject.toml's ``[tool.flwr.app]``; ``python -m
fedlora.simulate`` runs the same ``run_federation`` under Flower's simulation engine.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from server.run import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_dict(dict(context.run_config)))
