"""`python -m digits_demo demo|prepare`: trainguard's CLI (its quiet console and one-line errors) with the
example's two commands added."""

from __future__ import annotations

import sys

from digits_demo.cli import demo, prepare
from trainguard.pipeline.cli import app, main

app.add_command(demo)
app.add_command(prepare)
sys.exit(main())
