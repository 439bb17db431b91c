"""`python -m digits_demo demo|prepare|publish`: trainguard's CLI (its quiet console and one-line errors) with the
example's three commands added."""

from __future__ import annotations

import sys

from digits_demo.cli import demo, prepare, publish
from trainguard.pipeline.cli import app, main

app.add_command(demo)
app.add_command(prepare)
app.add_command(publish)
sys.exit(main())
