"""``python -m ese_assets.web``: the review web app and REST API (:mod:`ese_assets.web.server`)."""

import sys

from ese_assets.web.server import main

sys.exit(main())
