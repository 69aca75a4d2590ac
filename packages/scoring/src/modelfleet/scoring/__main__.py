"""`python -m modelfleet.scoring serve ...`"""

from .cli import main

raise SystemExit(main())
