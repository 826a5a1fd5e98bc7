"""A TCP proxy on 127.0.0.1 in front of the tests' S3 server: it counts the bytes that the server
sends, and stalls connections on demand, as a stalled server or network does."""
import socket
import threading


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server: on the first ``stalls`` connections
    whose answer passes ``after`` bytes (``then`` bytes after the first stall) it stops
    forwarding there, as a stalled server does."""

    def __init__(self, upstream: str, after: int = 0, stalls: int = 0, then: int | None = None):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.after, self.then = after, after if then is None else then
        self.stalls_left, self.stalled = stalls, 0
        self.answered = 0  # bytes the server sent
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, answer: bool):
        sent, after = 0, self.after if not self.stalled else self.then
        src.settimeout(10)
        try:
            while not self.stop.is_set():
                data = src.recv(4096)
                if not data:
                    break
                if answer and sent + len(data) > after:
                    with self.lock:
                        stall = self.stalls_left > 0
                        self.stalls_left -= stall
                        self.stalled += stall
                    if stall:  # forward up to the mark, then nothing more, until the reader leaves
                        dst.sendall(data[:max(after - sent, 0)])
                        self.stop.wait(30)
                        break
                dst.sendall(data)
                sent += len(data)
                if answer:
                    with self.lock:
                        self.answered += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.stop.set()
        self.server.close()
