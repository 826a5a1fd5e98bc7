import os
import sys
from pathlib import Path

import torch

# test helpers (synthetic scenes) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    # Triton kernels (dups/models/fused_attention.py) run in Triton's interpreter on a CPU. Triton reads
    # this when it is first imported, which xformers or inductor may do before any test runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true",
                     help="also the integration layer: tests on a real Ray, DeepSpeed engines, spawned "
                          "processes and servers (CI and the README's test command run both layers)")


def pytest_collection_modifyitems(config, items):
    """Without --integration (or an explicit -m), the fast unit layer only."""
    if config.getoption("--integration") or config.getoption("markexpr"):
        return
    kept = [item for item in items if "integration" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if "integration" in item.keywords])
        items[:] = kept


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-protocol server (moto) on 127.0.0.1; boto3 and pyarrow reach it through
    ``AWS_ENDPOINT_URL``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://{host}:{port}"
    import urllib.request  # the servers of one process share moto's state: start the next one empty

    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=10)
    server.stop()


def wait_until_answers(url: str, proc, what: str, seconds: float = 90) -> None:
    """Polls ``url`` until it answers; otherwise kills ``proc``'s process group and fails."""
    import os
    import signal
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{what} did not answer in {seconds:.0f} s")
