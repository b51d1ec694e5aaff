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

COPY pyproject.toml README.md ./
COPY app ./app
COPY mail ./mail
COPY loadtests ./loadtests
RUN pip install .
COPY gunicorn.conf.py ./

USER phoneshop

# gunicorn.conf.py reads everything else from the environment (.env.example).
ENV WEB_BIND=0.0.0.0:8000
EXPOSE 8000

# The same config file `make run` and the tests use.
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
