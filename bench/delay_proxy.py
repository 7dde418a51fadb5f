"""A TCP proxy that delays every chunk by a fixed time in each direction (a remote database).

    python bench/delay_proxy.py --listen 127.0.0.1:6543 --target 127.0.0.1:5432 --delay-ms 1

Each direction has a reader that stamps what it reads with "now + delay" and a writer that sends
it at that time, in order, so the delay adds latency without limiting throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, loop: asyncio.AbstractEventLoop
) -> None:
    """Copy reader to writer, each chunk sent delay seconds after it was read, in order."""
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def send() -> None:
        """Write each chunk when it is due, until the end marker."""
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((0.0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    """Accept connections on listen and pipe each to target, delayed both ways, until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """One client: a connection to the target, and a delayed pipe each way."""
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        for w in (client_writer, server_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay, loop), _pipe(server_reader, client_writer, delay, loop)
        )

    server = await asyncio.start_server(handle, *listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"delay proxy {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, {delay * 1000:g} ms each way", flush=True)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    """host:port (host defaults to 127.0.0.1)."""
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    """Run the proxy from the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--target", type=_address, default=("127.0.0.1", 5432))
    parser.add_argument("--delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.target, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
