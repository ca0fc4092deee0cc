"""``python -m text3dsam_cli`` runs the command-line interface."""

from text3dsam_cli.cli import main

main()
