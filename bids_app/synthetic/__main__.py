"""``python -m bids_app.synthetic OUTDIR``."""
import sys

from bids_app.synthetic import main

sys.exit(main())
