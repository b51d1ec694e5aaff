"""What the tests and the load tests both start: real processes on free 127.0.0.1 ports.

- servers.py: free ports, waiting for a port, stopping a process, a redis-server;
- stack.py: the whole stack (redis, gunicorn instances, nginx) in a temp folder;
- mail_sink.py: the dev SMTP sink (``python -m mail.sink``);
- cli.py: the command line of a measurement (its --json option and output).

Nothing here imports pytest or tests/: tests/ wraps these in fixtures, and the load
tests (which run without the test dependencies) call them directly.
"""
