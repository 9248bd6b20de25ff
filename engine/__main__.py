"""`python -m engine` is `labrelay`."""

from engine.cli import main

main(prog_name="labrelay")
