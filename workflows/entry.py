"""The ``seamline`` console script's target.

Processes that multiprocessing spawns from ``seamline`` (Dask workers of its local cluster, their
side processes) re-import the console script, so it imports only this module; the command line
(``workflows.cli``, ~190 MB of libraries) loads when ``main`` runs.
"""


def main() -> None:
    from workflows.cli import main as cli_main

    cli_main()
