# One image for the three UNITE services (teacher gateway, distiller, student server); docker-compose.yml
# picks the service with the `unite` subcommand it runs.
#
#   docker build -t unite-distill:local .
#   docker build --build-arg BASE_IMAGE=localhost/python-base:bookworm -t unite-distill:local .
#
# Stages: `base` (the Python base image), `deps` (a virtual environment with the requirements, a layer
# that changes only with requirements.txt), `build` (the project installed into that environment) and
# `runtime` (the environment copied onto a clean base, run as a non-root user).
#
# Offline builds, as air-gapped sites need them: put wheels of every requirement, plus setuptools>=68,
# into ./wheelhouse first, for example with the same Python 3.11 on linux x86-64:
#   python3 -m pip wheel -r requirements.txt "setuptools>=68" -w wheelhouse
# When ./wheelhouse holds wheels, pip installs from it alone (--no-index); otherwise it uses the package
# index, which the PIP_INDEX_URL and PIP_EXTRA_INDEX_URL build arguments can point elsewhere, for example
# PyTorch's CPU-only wheel index for a smaller image without CUDA.
#
# Model weights, slides, the embedding cache and checkpoints are mounted at /weights, /data, /cache and
# /checkpoints at run time; none of them is ever copied into the image (see .dockerignore).

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

FROM base AS deps
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# The glob copies ./wheelhouse's wheels next to requirements.txt when the folder exists and nothing otherwise.
COPY requirements.txt wheelhous[e] /tmp/deps/
RUN set -eu; \
    [ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL; \
    python3 -m venv /opt/venv; \
    if ls /tmp/deps/*.whl >/dev/null 2>&1; then \
        pip_source="--no-index --find-links /tmp/deps"; \
    else \
        pip_source=""; \
    fi; \
    /opt/venv/bin/pip install $pip_source "setuptools>=68"; \
    /opt/venv/bin/pip install $pip_source -r /tmp/deps/requirements.txt; \
    rm -rf /tmp/deps

FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY teacher_gateway ./teacher_gateway
COPY distiller ./distiller
COPY student_server ./student_server
COPY unite_cli ./unite_cli
# Every dependency is already in the environment, so the project installs without the network.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/venv/bin/unite --help >/dev/null

FROM base AS runtime
ARG UNITE_UID=10001
RUN set -eu; \
    groupadd --gid "${UNITE_UID}" unite; \
    useradd --uid "${UNITE_UID}" --gid unite --create-home --home-dir /home/unite --shell /usr/sbin/nologin unite; \
    mkdir -p /cache /checkpoints /data /weights /tmp/unite-uploads; \
    chown unite:unite /cache /checkpoints /tmp/unite-uploads
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/unite \
    UNITE_STUDENT_UPLOAD_DIR=/tmp/unite-uploads
USER unite
WORKDIR /home/unite
# Named volumes mounted here start with the ownership above, so the unite user can write them.
VOLUME ["/cache", "/checkpoints"]
EXPOSE 8100 8200
CMD ["unite", "--help"]
