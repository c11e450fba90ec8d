"""``python -m wm``: the same as the ``mwm`` command."""

from wm.cli import main

main()
