# The dispatcher image: the same package the tests install (`pip install .`),
# run as an unprivileged user. No secrets are baked in: configuration comes
# from environment variables (DANBYTE_DSN, ...) at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin danbyte

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sql ./sql
COPY dispatcher ./dispatcher
RUN pip install . && rm -rf /src

WORKDIR /
USER danbyte
# SIGTERM drains (finishes requests in flight), a second signal quits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["danbyte-webhooks"]
CMD ["run"]
