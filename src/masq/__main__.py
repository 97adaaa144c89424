"""``python -m masq`` is the ``masq`` command."""

from masq.cli import main

raise SystemExit(main())
