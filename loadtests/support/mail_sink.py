"""The dev SMTP sink (``python -m mail.sink``) as a process of a test or a load run."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.ops.instances import ROOT, mail_sink_argv
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port


@dataclass
class MailSink:
    """A ``python -m mail.sink`` process saving .eml files into ``directory``;
    ``cert`` is its self-signed certificate when it offers STARTTLS."""

    port: int
    directory: Path
    proc: subprocess.Popen
    cert: Path | None = None


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(cert, key) PEM files for 127.0.0.1, made with the openssl command."""
    cert, key = directory / "sink-cert.pem", directory / "sink-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextmanager
def running_sink(directory: Path, *, tls: bool = False) -> Iterator[MailSink]:
    """Start ``python -m mail.sink`` on a free port, saving into ``directory/mail``."""
    port = free_port()
    env = clean_env(
        SMTP_PORT=str(port), MAIL_SINK_DIR=str(directory / "mail"), PYTHONPATH=str(ROOT)
    )
    cert = None
    if tls:
        cert, key = self_signed_certificate(directory)
        env.update(MAIL_SINK_TLS_CERT=str(cert), MAIL_SINK_TLS_KEY=str(key))
    proc = subprocess.Popen(
        mail_sink_argv(),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield MailSink(port, directory / "mail", proc, cert)
    finally:
        stop_process(proc)
