"""`python -m objective_server` is `birdie-server` (for environments without the console script)."""

from objective_server.cli import main

main(prog_name="birdie-server")
