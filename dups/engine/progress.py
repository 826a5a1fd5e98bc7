"""Progress bars and log lines that reach the user wherever the code runs.

In a Ray worker (Ray Train's ranks, Ray tasks) a plain tqdm bar writes carriage-return
frames into the job's log, one line per refresh; Ray's ``tqdm_ray`` sends the bar's state to
the driver, which draws it once. Ray workers also start with no logging configured, so the
project's INFO lines (throughput, the pre-trained weights report) would be dropped there.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s %(message)s"


def in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (Ray and pytest replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The project's loggers (``dups.*``, ``pipeline.*``, ...) at ``level`` to stderr, which
    Ray forwards to the driver and the job log; once per process."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


class ProgressBar:
    """``tqdm`` here, ``tqdm_ray`` inside a Ray worker; the few calls both understand."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 disable: bool = False):
        self.desc, self.bar = desc, None
        if disable:
            return
        if in_ray_worker():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self.bar = ray_tqdm(total=total, desc=desc, unit=unit)
            if initial:
                self.bar.update(initial)
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is None:
            return
        if postfix:
            shown = " ".join(f"{k}={v}" for k, v in postfix.items())
            if hasattr(self.bar, "set_postfix_str"):
                self.bar.set_postfix_str(shown, refresh=False)
            else:
                self.bar.set_description(f"{self.desc} {shown}")
        self.bar.update(n)

    def write(self, line: str) -> None:
        """One line on stderr that the bar does not break (tqdm redraws below it)."""
        if self.bar is not None and hasattr(self.bar, "write"):
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
