# syntax=docker/dockerfile:1
# audit-reverser: wheels are built in one stage and installed, from those wheels only, into a
# slim final stage that runs as a non-root user. `docker build -t audit-reverser .`
# .ci/dockerfile-steps runs these same steps in clean virtual environments on every CI run.
ARG PYTHON=python:3.12-slim

FROM ${PYTHON} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY audit_reverser ./audit_reverser
# Binary wheels only: nothing is compiled, so no compiler is needed here or later.
RUN pip wheel --no-cache-dir --only-binary=:all: --wheel-dir /wheels .

FROM ${PYTHON}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="audit-reverser" \
      org.opencontainers.image.description="Kubernetes audit events in, attributed YAML commits in Git out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Two malloc arenas: by default glibc gives each allocating thread its own (up to 8 per core),
# each keeping its free memory; a serve pushing over SSH peaked 45 MiB higher (docs/operations.md).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MALLOC_ARENA_MAX=2
# OpenSSH's client carries our own packs to SSH remotes (gitstore/packpush.py: half the CPU
# and about 100 MiB less memory per push than libgit2's pack builder); without it, SSH pushes
# fall back to libgit2. Only the client, no recommended extras, no package lists kept.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*
# The wheels are mounted for this one step, so they never become a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels audit-reverser \
    && groupadd --gid 10001 audit-reverser \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /state audit-reverser \
    && mkdir /state && chown 10001:10001 /state
USER 10001
# All state (the journal, the mirrors, generated keys) lives in this volume, which Docker
# creates owned by the user above; the root filesystem can be read-only.
VOLUME ["/state"]
WORKDIR /state
EXPOSE 8443
ENTRYPOINT ["audit-reverser", "serve"]
CMD ["--state-dir", "/state"]
