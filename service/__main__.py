"""``python -m service``: the same as ``dclgan serve``."""

from service.serve import main

raise SystemExit(main())
