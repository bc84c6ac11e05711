# syntax=docker/dockerfile:1
# Build stage: a wheel of vmigrate and wheels of its dependencies.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: no compilers, a non-root user, data under /var/lib/vmigrate.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-utils openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /var/lib/vmigrate --uid 10001 vmigrate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The schema migrations are not in the wheel: the installed app looks for alembic.ini
# (and the alembic/ scripts beside it) in <sys.prefix>/share/vmigrate (app/db.py), and
# ALEMBIC_CONFIG lets `alembic upgrade head` find the same file from any directory.
COPY alembic.ini /usr/local/share/vmigrate/alembic.ini
COPY alembic /usr/local/share/vmigrate/alembic
USER vmigrate
WORKDIR /var/lib/vmigrate
ENV VMIGRATE_DATA_DIR=/var/lib/vmigrate/data \
    VMIGRATE_HOST=0.0.0.0 \
    VMIGRATE_PORT=8080 \
    ALEMBIC_CONFIG=/usr/local/share/vmigrate/alembic.ini
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)" || exit 1
CMD ["vmigrate", "serve"]
