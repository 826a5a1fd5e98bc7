"""`dups submit` / `dups jobs`: any dups command as a Ray job, through Ray's Job Submission API.

The working directory travels as the job's runtime env (so the cluster runs this checkout's
code); S3 and MLflow settings travel as environment variables, named in the output but never
printed with their values; credentials only with ``--forward-credentials``.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

EXCLUDES = [".git", ".venv", "demo_run", "runs", "mlruns", "mlruns.db", "*.tar", "__pycache__",
            ".pytest_cache", "*.egg-info"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def entrypoint(command: list[str], python: str | None = None) -> str:
    """The job's shell command. Ray runs it on the head with the head's PATH, whose ``python``
    is often not the project's (a head started as ``.venv/bin/ray start`` keeps the user's
    PATH), so it takes the first of: ``python`` if given; else this interpreter's path (a head
    on this machine), ``python3``, ``python``, that imports torch and ray, and names what it
    tried when none does."""
    candidates = [python] if python else [sys.executable, "python3", "python"]
    tried = " ".join(shlex.quote(c) for c in candidates)
    return (f"for py in {tried}; do if \"$py\" -c 'import torch, ray' 2>/dev/null; then "
            f"exec \"$py\" -m dups.cli {shlex.join(command)}; fi; done; "
            f"echo \"dups submit: no Python on the head imports torch and ray (tried: {tried}); start the "
            f"head from the project's environment or pass --python (README, Cluster)\" >&2; exit 2")


def dups_command(command: list[str], known: list[str] | None = None) -> list[str]:
    """The dups subcommand and its arguments, as the job will run them: a leading ``dups``
    (``dups submit -- dups train X``) dropped; a subcommand not in ``known`` (``dups``'s own,
    as the CLI passes them) refused here, before anything is uploaded."""
    if command[:1] and Path(command[0]).name == "dups":
        command = command[1:]
    if not command:
        raise ValueError("nothing to submit: give a dups command after --, e.g. dups submit -- train demo")
    if known is not None and command[0] not in known:
        raise ValueError(f"unknown dups command {command[0]!r} after --; choose one of {', '.join(sorted(known))}")
    return command


def submit(command: list[str], address: str | None = None, follow: bool = False,
           working_dir: str = ".", pip: list[str] | None = None, out=sys.stdout,
           forward_credentials: bool = False, python: str | None = None, known: list[str] | None = None) -> str:
    """``forward_credentials``: also pass AWS keys / tokens and MLflow passwords in the job's
    runtime env (which Ray's job API shows to anyone who reaches it); by default the cluster's
    instance role serves S3 and only settings travel. ``python``: the head's interpreter
    that has the project installed (default: found, see ``entrypoint``). ``known``: the
    subcommands to accept (the CLI passes its own; None: any)."""
    from dups.cluster.credentials import forwarded_env

    command = dups_command(command, known)
    env = forwarded_env(forward_credentials)
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env}
    if pip:
        runtime_env["pip"] = pip
    c = client(address)
    job_id = c.submit_job(entrypoint=entrypoint(command, python), runtime_env=runtime_env)
    print(f"submitted {job_id}: dups {shlex.join(command)}", file=out)
    if env:
        print(f"environment passed to the job: {', '.join(sorted(env))} (values not shown)", file=out)
    if follow:
        status = follow_logs(c, job_id, out)
        print(f"job {job_id} {status}", file=out)
    return job_id


def follow_logs(c, job_id: str, out=sys.stdout) -> str:
    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()
    asyncio.run(tail())
    return str(c.get_job_status(job_id))


def jobs(action: str, job_id: str | None = None, address: str | None = None, out=sys.stdout) -> None:
    c = client(address)
    if action == "list":
        for job in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            shown = re.search(r"-m dups\.cli (.*?); fi", job.entrypoint)
            what = f"dups {shown[1]}" if shown else job.entrypoint
            print(f"{job.submission_id or job.job_id:<28}{str(job.status):<12}{what[:80]}", file=out)
    elif action == "logs":
        out.write(c.get_job_logs(job_id))
    elif action == "stop":
        stopped = c.stop_job(job_id)
        print(f"stop {job_id}: {'requested' if stopped else 'not running'}", file=out)
    else:
        raise ValueError(f"unknown jobs action {action!r}; choose list, logs or stop")
