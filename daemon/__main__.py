"""``python -m livelm.daemon serve ...``: the same as the ``livelm`` command."""

from livelm.daemon.cli import main

raise SystemExit(main())
