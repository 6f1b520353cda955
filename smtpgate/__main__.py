"""`python -m smtpgate` runs the command-line interface."""

from smtpgate.cli import main

raise SystemExit(main())
