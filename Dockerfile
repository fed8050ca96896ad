# Images of the UNITE services, one build target each. The torch targets share one dependency layer.
#
#   gateway        unite serve-gateway (the teacher gateway), port 8100
#   distiller      unite distill-worker (trains and publishes students); also runs `unite teach`
#   student        unite serve-student (the student server, torch), port 8200
#   student-onnx   unite serve-student with UNITE_STUDENT_RUNTIME=onnx: the ONNX export through
#                  onnxruntime, without torch, for a slim CPU image
#
#   docker build --target student -t unite-student:local .
#   docker build --target student --build-arg BASE_IMAGE=localhost/python-base:bookworm -t unite-student:local .
#
# Stages: `base` (the Python base image and the non-root user), `deps` (a virtual environment with
# requirements.txt: the one large layer, which gateway, distiller and student share and which changes
# only with the requirements), `runtime` (the project installed on top), then one small stage per
# service that sets its command. `student-onnx` has its own smaller environment (`deps-onnx`).
#
# Offline builds, as air-gapped sites need them: put wheels of every requirement, plus setuptools>=68,
# into ./wheelhouse first, with the image's Python version on the same platform (Debian 12 and the
# python:3.11 images have Python 3.11 on linux x86-64), for example:
#   python3 -m pip wheel -r requirements.txt "setuptools>=68" -w wheelhouse
# scripts/compose-up.sh does that and caches the result outside the checkout. When ./wheelhouse contains
# wheels, pip installs from it alone (--no-index); otherwise it uses the package index, which the
# PIP_INDEX_URL and PIP_EXTRA_INDEX_URL build arguments can point elsewhere, for example PyTorch's
# CPU-only wheel index for a smaller image without CUDA libraries.
#
# The wheelhouse is bind-mounted into the install step (RUN --mount, which needs BuildKit or Buildah),
# so the wheels never become an image layer.
#
# Model weights, slides, the embedding cache and checkpoints are mounted at /weights, /data, /cache and
# /checkpoints at run time; none of them is ever copied into an image (see .dockerignore).

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ARG UNITE_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN set -eu; \
    groupadd --gid "${UNITE_UID}" unite; \
    useradd --uid "${UNITE_UID}" --gid unite --create-home --home-dir /home/unite --shell /usr/sbin/nologin unite; \
    mkdir -p /cache /checkpoints /data /weights /tmp/unite-uploads /tmp/unite-jobs; \
    chown unite:unite /cache /checkpoints /tmp/unite-uploads /tmp/unite-jobs

FROM base AS deps
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# Copied, though the install step reads the context, because Buildah's layer cache does not hash what a
# RUN --mount binds: this layer's checksum makes the install step rerun whenever the requirements change.
COPY requirements.txt /opt/requirements.txt
RUN --mount=type=bind,source=.,target=/context \
    set -eu; \
    [ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL; \
    if ls /context/wheelhouse/*.whl >/dev/null 2>&1; then \
        pip_source="--no-index --find-links /context/wheelhouse"; \
    else \
        pip_source=""; \
    fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install $pip_source "setuptools>=68"; \
    /opt/venv/bin/pip install $pip_source -r /opt/requirements.txt

FROM deps AS runtime
COPY pyproject.toml README.md /tmp/unite-src/
COPY shared /tmp/unite-src/shared
COPY teacher_gateway /tmp/unite-src/teacher_gateway
COPY distiller /tmp/unite-src/distiller
COPY student_server /tmp/unite-src/student_server
COPY unite_cli /tmp/unite-src/unite_cli
# Every dependency is already in the environment, so the project installs without the network.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index /tmp/unite-src \
    && rm -rf /tmp/unite-src \
    && /opt/venv/bin/unite --help >/dev/null
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/unite \
    UNITE_STUDENT_UPLOAD_DIR=/tmp/unite-uploads \
    UNITE_STUDENT_JOBS_DIR=/tmp/unite-jobs
USER unite
WORKDIR /home/unite
# An empty named volume mounted at /cache or /checkpoints starts with the ownership set in `base`, so the
# unite user can write it. There is no VOLUME instruction, because it would give every container that
# mounts only one of the two an anonymous volume for the other, left behind by `docker compose down`.

FROM runtime AS gateway
EXPOSE 8100
CMD ["unite", "serve-gateway", "--host", "0.0.0.0", "--port", "8100", "--cache-dir", "/cache/embeddings"]

FROM runtime AS distiller
CMD ["unite", "distill-worker", "--shards", "/cache/shards", "--out", "/checkpoints/worker", "--publish-root", "/checkpoints/published"]

FROM runtime AS student
EXPOSE 8200
CMD ["unite", "serve-student", "--host", "0.0.0.0", "--port", "8200", "--checkpoint", "/checkpoints/published"]

# The slim student: its own environment from STUDENT_ONNX_REQUIREMENTS (requirements.txt without
# torch, torchvision, timm, Lightning, TensorBoard and the test tools), serving the ONNX export
# (model.onnx) of the published student.
FROM base AS deps-onnx
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG STUDENT_ONNX_REQUIREMENTS=requirements-student-onnx.txt
COPY ${STUDENT_ONNX_REQUIREMENTS} /opt/requirements.txt
RUN --mount=type=bind,source=.,target=/context \
    set -eu; \
    [ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL; \
    if ls /context/wheelhouse/*.whl >/dev/null 2>&1; then \
        pip_source="--no-index --find-links /context/wheelhouse"; \
    else \
        pip_source=""; \
    fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install $pip_source "setuptools>=68"; \
    /opt/venv/bin/pip install $pip_source -r /opt/requirements.txt

FROM deps-onnx AS student-onnx
COPY pyproject.toml README.md /tmp/unite-src/
COPY shared /tmp/unite-src/shared
COPY teacher_gateway /tmp/unite-src/teacher_gateway
COPY distiller /tmp/unite-src/distiller
COPY student_server /tmp/unite-src/student_server
COPY unite_cli /tmp/unite-src/unite_cli
# --no-deps keeps torch out: pyproject.toml lists it, but the ONNX runtime never imports it. The import
# check fails the build if torch came in anyway.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index /tmp/unite-src \
    && rm -rf /tmp/unite-src \
    && /opt/venv/bin/unite --help >/dev/null \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/unite \
    UNITE_STUDENT_RUNTIME=onnx \
    UNITE_STUDENT_UPLOAD_DIR=/tmp/unite-uploads \
    UNITE_STUDENT_JOBS_DIR=/tmp/unite-jobs
USER unite
WORKDIR /home/unite
EXPOSE 8200
CMD ["unite", "serve-student", "--host", "0.0.0.0", "--port", "8200", "--checkpoint", "/checkpoints/published"]
