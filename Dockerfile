# audit-reverser: build wheels in one stage, run them in a slim, non-root final stage.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY audit_reverser ./audit_reverser
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
LABEL org.opencontainers.image.title="audit-reverser" \
      org.opencontainers.image.description="Kubernetes audit events in, attributed YAML commits in Git out" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels audit-reverser \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --home-dir /state audit-reverser
USER 10001
# All state (mirrors) lives in this volume; the root filesystem can be read-only.
VOLUME ["/state"]
WORKDIR /state
EXPOSE 8080
ENTRYPOINT ["audit-reverser", "serve", "--state-dir", "/state"]
