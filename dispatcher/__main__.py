"""``python -m dispatcher`` is the ``danbyte-webhooks`` command."""

from dispatcher.cli import main

main()
