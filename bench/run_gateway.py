"""`smtpgate serve` on a chosen event loop (the CLI itself picks uvloop whenever installed)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from smtpgate import cli


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--profile", help="write a cProfile of the event-loop thread here")
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (seconds)")
    parser.add_argument(
        "--all-durable",
        action="store_true",
        help="fsync every commit (measures what synchronous=NORMAL for bookkeeping saves)",
    )
    args, rest = parser.parse_known_args()
    if args.all_durable:
        from smtpgate.store import Store

        write = Store._write

        def always_durable(self: Store, fn: Any, **options: Any) -> Any:
            return write(self, fn, **{**options, "durable": True})

        Store._write = always_durable  # type: ignore[method-assign]
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.loop == "asyncio":
        cli._event_loop_runner = lambda: asyncio.run
    else:
        import uvloop

        cli._event_loop_runner = lambda: uvloop.run
    if not args.profile:
        return cli.main(["serve", *rest])
    import cProfile

    profiler = cProfile.Profile()
    try:
        return int(profiler.runcall(cli.main, ["serve", *rest]))
    finally:
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    sys.exit(main())
