# syntax=docker/dockerfile:1
# One image for every tandem process:
#   API (default):  tandem api --host 0.0.0.0 --port 8000
#   worker:         tandem worker
# Configuration comes from TANDEM_* environment variables (see README); docker-compose.yml runs both.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid tandem --home-dir /app --no-create-home --shell /usr/sbin/nologin tandem

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY api ./api
COPY workers ./workers
COPY shared ./shared
COPY cli ./cli
RUN pip install . && rm -rf build *.egg-info
COPY deploy/healthcheck.py ./deploy/healthcheck.py

# No write access to the code; nothing is written to disk at run time (Redis holds all state).
USER tandem:tandem
EXPOSE 8000
# SIGTERM: the API stops taking connections and closes open SSE responses within
# TANDEM_SSE_SHUTDOWN_GRACE_S (clients resume on another replica); a worker stops its jobs.
STOPSIGNAL SIGTERM
CMD ["tandem", "api", "--host", "0.0.0.0", "--port", "8000"]
