"""``python -m loadtests`` (``make loadtest``): a short, bounded, headless Locust run
against a fresh stack, then the verifier.

1. starts a fresh stack (loadtests/stack.py: redis, 2 app instances, nginx, the
   mail worker and the dev SMTP sink) on free 127.0.0.1 ports, or HTTP_PORT;
2. runs Locust headless with the step-ramp shape (loadtests/shapes.py) and the
   options in locust.conf; Locust checks its thresholds when it quits;
3. runs ``loadtests.verify`` against the same stack, mails included;
4. stops the stack.

Everything lands in ``loadtests/reports/loadtest/``: Locust's CSV files and
HTML report, the ledger, verify.json and the stack's logs. Exits non-zero
when a threshold was missed or the verification failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from loadtests import verify
from loadtests.stack import launch
from nginx.instances import ROOT

REPORTS = ROOT / "loadtests" / "reports"
LOCUST_CONF = ROOT / "locust.conf"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def locust_command(
    host: str, out: Path, *, setup_host: str = "", extra: list[str] | None = None
) -> list[str]:
    """The headless Locust command line both `make loadtest` and `make bench` run."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "--config",
        str(LOCUST_CONF),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
        "--ledger",
        str(out / "ledger.json"),
        "--logfile",
        str(out / "locust.log"),
    ]
    if setup_host:
        command += ["--setup-host", setup_host]
    return command + (extra or [])


def run_locust(command: list[str], *, shape: str, admin_token: str, timeout: float) -> int:
    env = {**os.environ, "ADMIN_TOKEN": admin_token, "PHONESHOP_SHAPE": shape}
    env.pop("LOCUST_LOCUSTFILE", None)
    try:
        return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"locust did not finish within {timeout:.0f}s", file=sys.stderr)
        return 124


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPORTS / "loadtest")
    parser.add_argument("--shape", default="step", choices=("step", "overflow"))
    parser.add_argument("--mail-timeout", type=float, default=120.0)
    parser.add_argument(
        "locust_args", nargs="*", help="more Locust options, after --, e.g. -- --steps 3"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    started = time.monotonic()
    with launch(directory=out / "stack", mail=True) as stack:
        print(f"stack up: {stack.http_url} (folder {stack.directory})", flush=True)
        command = locust_command(
            stack.http_url, out, setup_host=stack.direct_url, extra=args.locust_args
        )
        locust_status = run_locust(
            command, shape=args.shape, admin_token=stack.admin_token, timeout=420
        )
        ledger_path = out / "ledger.json"
        if not ledger_path.exists():
            print("locust wrote no ledger: nothing to verify", file=sys.stderr)
            return 1
        ledger = json.loads(ledger_path.read_text())
        result = asyncio.run(
            verify.verify(
                ledger,
                stack.http_url,
                stack.admin_token,
                redis_url=stack.redis_url,
                mail_timeout=args.mail_timeout,
            )
        )
    (out / "verify.json").write_text(json.dumps(result, indent=2))
    summary = ledger["summary"]
    print()
    print(
        f"locust: {summary['requests']} requests, {summary['failures']} failures "
        f"({summary['failure_ratio']:.4%}), {summary['shed']} shed, "
        f"accepted p50/p95/p99 {summary['accepted_p50_ms']:.0f}/"
        f"{summary['accepted_p95_ms']:.0f}/{summary['accepted_p99_ms']:.0f} ms, "
        f"{len(ledger['orders'])} orders acknowledged"
    )
    for reason in summary["missed"]:
        print(f"locust: threshold missed: {reason}")
    print(verify.render(result))
    print(f"reports in {out} ({time.monotonic() - started:.0f}s)")
    return 0 if locust_status == 0 and result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
