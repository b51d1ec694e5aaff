"""Keep one live-events WebSocket open on each given app instance and drain it, so
that every instance's event hub reads and fans out each order event: the busy
side of the bench's hub A/B (loadtests/bench.py).

    python -m loadtests.ws_listen SECONDS TOKEN URL [URL ...]

Stops after SECONDS (bounded, like every load step) or on SIGTERM; prints the
number of messages each socket received.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp


async def listen(url: str, token: str, stop: asyncio.Event) -> int:
    received = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url}/orders/events", headers=headers, heartbeat=30) as socket,
    ):
        while not stop.is_set():
            reader = asyncio.ensure_future(socket.receive())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                reader.cancel()
                break
            stopper.cancel()
            message = reader.result()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
            received += 1
    return received


async def main_async(seconds: float, token: str, urls: list[str]) -> list[int]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(seconds, stop.set)
    return await asyncio.gather(*(listen(url, token, stop) for url in urls))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    counts = asyncio.run(main_async(float(args[0]), args[1], args[2:]))
    print(f"ws_listen: messages per socket {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
