# PhoneShop's app image: the API (gunicorn + aiohttp on uvloop) and, with another
# command, the mail worker (`python -m mail`). Used by docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/phoneshop

# An unprivileged user owns nothing it could rewrite: the code stays root's.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /srv/phoneshop --shell /usr/sbin/nologin phoneshop

# The locked runtime dependencies first (exact versions, hashes checked), so
# this layer is rebuilt only when the lock changes, not with every code change.
COPY app/ops/requirements/base.txt app/ops/requirements/base.txt
RUN pip install --require-hashes --no-deps -r app/ops/requirements/base.txt

# Only what the image runs: the app and the mail worker (no tests, load tests,
# nginx or ops tooling; .dockerignore keeps those out of the context too). They
# run from here, not installed, so nothing is resolved again at build time.
COPY app ./app
COPY mail ./mail
COPY gunicorn.conf.py ./
ENV PYTHONPATH=/srv/phoneshop

USER phoneshop

# gunicorn.conf.py reads everything else from the environment (.env.example).
ENV WEB_BIND=0.0.0.0:8000
EXPOSE 8000

# The same config file `make run` and the tests use.
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
