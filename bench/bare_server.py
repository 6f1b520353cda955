"""The baseline: a bare aiosmtpd server whose handler answers 250 without storing anything.

Built the way smtpgate builds its listener (loop.create_server with aiosmtpd.smtp.SMTP, same
size limit, bytes not decoded), so the difference to smtpgate is what smtpgate does per message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session


class Handler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 2.0.0 OK"


async def serve(port: int) -> None:
    handler = Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=26214400,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="bare.bench",
            ident="bare aiosmtpd",
            timeout=300,
        ),
        host="127.0.0.1",
        port=port,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    print(f"accepted {handler.count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
