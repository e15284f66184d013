"""`python -m quantpipe` is the CLI."""

from quantpipe.cli import main

raise SystemExit(main())
