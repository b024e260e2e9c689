"""A real S3-compatible server (moto) in its own process on loopback, for fsspec/s3fs tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server():
    """Start `python -m moto.server` on 127.0.0.1; yield (endpoint_url, env vars for s3fs clients)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # bounded wait for the server to answer
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto server exited on start")
                time.sleep(0.1)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
        yield endpoint, env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_options(endpoint: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)


class _Proxy:
    """A TCP proxy process on loopback in front of `endpoint`. `stop()` kills it with SIGKILL (open
    connections drop, new ones are refused: the store is unreachable, though its data is kept);
    `start()` brings it back on the same port.

    `latency` (seconds) is added to every request: a connection's client bytes that follow the
    server's (or open the connection) wait that long before they are passed on, as a store's round
    trip would make them (HTTP/1.1 clients send one request at a time on a connection)."""

    _CODE = r"""
import asyncio, sys
host, port, target_port, latency = "127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def pipe(r, w, turn, request):
    try:
        while data := await r.read(65536):
            if request and turn[0] and latency:
                await asyncio.sleep(latency)  # a new request
            turn[0] = not request  # True: the server spoke last
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        sr, sw = await asyncio.open_connection(host, target_port)
    except OSError:
        cw.close()
        return
    turn = [True]
    await asyncio.gather(pipe(cr, sw, turn, True), pipe(sr, cw, turn, False))
async def main():
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

    def __init__(self, endpoint: str, latency: float = 0.0):
        self.target_port, self.latency = int(endpoint.rsplit(":", 1)[1]), latency
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        for _ in range(50):  # the port may linger a moment after a kill
            self.proc = subprocess.Popen([sys.executable, "-c", self._CODE, str(self.port), str(self.target_port),
                                          str(self.latency)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if self.proc.stdout.readline().strip() == "ready":
                return
            self.proc.wait()
            time.sleep(0.1)
        raise RuntimeError(f"proxy could not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def tcp_proxy(endpoint: str, *, latency: float = 0.0):
    """Yield a started `_Proxy` to `endpoint`, `latency` seconds added to every request; stopped on exit."""
    proxy = _Proxy(endpoint, latency)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextmanager
def black_hole():
    """Yield the URL of a listener on loopback that accepts connections and never answers (a black-holed
    endpoint: the usual way a network dies). Connections are held open until the block ends."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # the accept timed out: look at `stop` again
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
