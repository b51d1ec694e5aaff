"""``python -m loadtests`` (``make loadtest``): a short, bounded, headless Locust run
against a fresh stack, then the verifier.

1. starts a fresh stack (loadtests/stack.py: redis, 2 app instances, nginx, the
   mail worker and the dev SMTP sink) on free 127.0.0.1 ports, or HTTP_PORT, and
   pins it to the stack CPUs (loadtests/rig.py: STACK_CPUS / LOAD_CPUS);
2. runs Locust headless on the load CPUs with the step-ramp shape, or with
   ``--shape overflow`` the overflow shape (half load, ``--overload-factor`` x
   ``--capacity-rps``, half load again; loadtests/shapes.py), and the options in
   locust.conf; Locust checks its thresholds when it quits;
3. compares, per phase, the rate Locust answered with the rate the phase asked
   for (users x user rate): a phase more than 5% short is reported as
   under-offered, its figures not the shop's;
4. runs ``loadtests.verify`` against the same stack, mails included;
5. stops the stack.

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

from app.ops.instances import ROOT
from loadtests import rig, verify
from loadtests.stack import LoadStack, launch

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


def run_locust(
    command: list[str],
    *,
    shape: str,
    admin_token: str,
    timeout: float,
    cpus: frozenset[int] | None = None,
) -> int:
    """Locust headless, on ``cpus`` (None: wherever the OS puts it)."""
    env = {**os.environ, "ADMIN_TOKEN": admin_token, "PHONESHOP_SHAPE": shape}
    env.pop("LOCUST_LOCUSTFILE", None)
    try:
        return subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            timeout=timeout,
            check=False,
            preexec_fn=rig.pinned_to(cpus),
        ).returncode
    except subprocess.TimeoutExpired:
        print(f"locust did not finish within {timeout:.0f}s", file=sys.stderr)
        return 124


def pin_load_stack(stack: LoadStack, split: rig.CpuSplit) -> dict | None:
    """Pin redis, the app instances, nginx and the mail processes to the stack CPUs."""
    if not split.pinned:
        return None
    s = stack.stack
    procs = [s.redis.proc, *(i.proc for i in s.instances), s.nginx.proc]
    if stack.mail is not None:
        procs += [stack.mail.sink, stack.mail.worker]
    front = [s.nginx.proc.pid] if s.nginx.proc is not None else []
    return rig.pin_stack([p.pid for p in procs if p is not None], split.stack, front=front)


def offered_by_phase(ledger: dict, user_rate: float) -> list[dict]:
    """Per phase of the shape: the rate asked for (users x user rate), the rate Locust
    answered, and whether it kept within 5% of it (a closed-loop user that waits on a
    slow answer falls behind, and then the phase did not apply its load)."""
    rows = []
    for plan in ledger.get("plan", []):
        figures = ledger["timeline"]["phases"].get(plan["phase"])
        planned = plan["users"] * user_rate
        offered = figures["rps"] if figures else 0.0
        rows.append(
            {
                "phase": plan["phase"],
                "planned_rps": planned,
                "offered_rps": offered,
                "valid": offered >= rig.VALID_SHARE * planned,
            }
        )
    return rows


def user_rate_of(locust_args: list[str]) -> float:
    """--user-rate from the extra Locust arguments, else locust.conf's value."""
    for i, arg in enumerate(locust_args):
        if arg.startswith("--user-rate="):
            return float(arg.split("=", 1)[1])
        if arg == "--user-rate" and i + 1 < len(locust_args):
            return float(locust_args[i + 1])
    for line in LOCUST_CONF.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "user-rate":
            return float(value.strip())
    return 2.0


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
    split = rig.cpu_split()
    with launch(directory=out / "stack", mail=True) as stack:
        pinning = pin_load_stack(stack, split)
        print(f"stack up: {stack.http_url} (folder {stack.directory})", flush=True)
        print(f"rig: {split.describe()}; pinning read back: {pinning}", flush=True)
        command = locust_command(
            stack.http_url, out, setup_host=stack.direct_url, extra=args.locust_args
        )
        locust_status = run_locust(
            command,
            shape=args.shape,
            admin_token=stack.admin_token,
            timeout=420,
            cpus=split.load or None,
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
    offered = offered_by_phase(ledger, user_rate_of(args.locust_args))
    (out / "offered.json").write_text(json.dumps(offered, indent=2))
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
    for row in offered:
        verdict = "ok" if row["valid"] else "UNDER-OFFERED: not the shop's figures at this load"
        print(
            f"locust phase {row['phase']}: offered {row['offered_rps']:,.0f} of "
            f"{row['planned_rps']:,.0f} req/s ({verdict})"
        )
    print(verify.render(result))
    print(f"reports in {out} ({time.monotonic() - started:.0f}s)")
    return 0 if locust_status == 0 and result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
