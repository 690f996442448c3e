# dclgan-serve: the HTTP service only (service/ over onnxruntime). No torch and no training code:
# the image installs the project's `serve` extra, never `train`.
#
#   docker build -t dclgan-serve:gpu .                          # default: CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker build --build-arg VARIANT=cpu -t dclgan-serve:cpu .  # python:3.11-slim, onnxruntime CPU + OpenVINO
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 dclgan-serve:gpu
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/models:/app/models:ro" dclgan-serve:cpu
#
# BuildKit is needed (Docker >= 23 uses it by default; DOCKER_BUILDKIT=1 before): the legacy builder
# would build every stage, the unused base included. There is no `# syntax=` line on purpose: the
# builder's own Dockerfile frontend is enough, and a syntax line would make BuildKit fetch a frontend
# image first, which fails on a machine that reaches no image registry.
#
# Behind a TLS-intercepting proxy, give pip the proxy's CA bundle as a build secret: it is mounted
# only while pip runs and never stored in a layer of the image.
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
#
# Stages: python-gpu / python-cpu are the runtime bases (an interpreter and nothing else); venv
# pip-installs the service into /opt/venv on the chosen base (sources and pip's work stay behind); the
# final stage is that base plus /opt/venv plus models/.
#
# Stopping: SIGTERM starts the service's drain (readiness 503, queued work finishes, exit 0) for up
# to DCLGAN_DRAIN_TIMEOUT_S (default 30 s). `docker stop` waits only 10 s before SIGKILL, so give it
# more: `docker stop -t 45`, or compose's `stop_grace_period: 45s` (docker-compose.yml).

# gpu or cpu: which python-* base the virtualenv and the image are built on.
ARG VARIANT=gpu
# onnxruntime-gpu 1.27-1.31 (pyproject's serve extra) is built for CUDA 13.x and cuDNN 9; on a CUDA 12
# base it silently falls back to the CPU (serving-notes §7.1). 13.0 is the oldest CUDA 13 minor, so the
# first CUDA 13 driver branch (R580) runs it without relying on minor-version compatibility.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim

# --- runtime bases ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS python-gpu
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11); versions come from the pinned base tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The service refuses to start if onnxruntime cannot use this GPU (DCLGAN_REQUIRE_GPU defaults to true).
ENV DCLGAN_DEVICES=cuda:0

FROM ${CPU_IMAGE} AS python-cpu
ENV DCLGAN_DEVICES=cpu

# --- the virtualenv ---------------------------------------------------------------------------
# Built on the runtime base it will run on (same interpreter path), then copied alone into the image.
# hadolint ignore=DL3006
FROM python-${VARIANT} AS venv
ARG VARIANT
WORKDIR /src
COPY pyproject.toml ./
# Dependencies first, in their own layer, so that editing service/ does not download them again: the
# base and serve requirements read from pyproject. The CPU image swaps onnxruntime-gpu (about 255 MB)
# for the CPU wheel of the same versions (both install the `onnxruntime` module: only one may be present)
# and adds the cpu-fast extra: OpenVINO, which DCLGAN_ENGINE=auto then times against onnxruntime at start
# and serves CPU devices with where it is the faster (README, "Engines and precision"); the GPU image serves with onnxruntime-gpu and does not need it. Both get the
# otel extra (about 8 MB of pure Python): tracing then needs only the OTEL_* variables, and costs nothing
# while they are unset (README, "Tracing").
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/venv \
    && python3 -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
cpu = os.environ['VARIANT'] == 'cpu'; extras = p['optional-dependencies']; \
serve = extras['serve'] + extras['otel']; \
serve = [r.replace('onnxruntime-gpu', 'onnxruntime') for r in serve] + extras['cpu-fast'] if cpu else serve; \
print('\n'.join(p['dependencies'] + serve))" \
        > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
# pyproject's package find includes `training*` and `service*`; without training/ only service is
# packaged. The `dclgan` console script (training.cli) is therefore broken here: use `python -m service`.
COPY README.md ./
COPY service/ service/
# Building the package fetches its build backend (setuptools), hence the CA secret here too.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps .

# --- the image --------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM python-${VARIANT}
# A fixed uid/gid clear of the bases' own users (ubuntu:24.04 has uid 1000): a mounted models/ only
# needs to be world-readable, and a numeric USER lets Kubernetes' runAsNonRoot verify it.
RUN groupadd --system --gid 10001 dclgan \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dclgan
COPY --from=venv /opt/venv /opt/venv
# The bundled models; mount a repository over /app/models to serve others (read-only is enough).
COPY models/ /app/models/
WORKDIR /app
# The service binds 127.0.0.1 by default: in a container it must listen on every interface.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DCLGAN_HOST=0.0.0.0 \
    DCLGAN_PORT=8000 \
    DCLGAN_MODELS_DIR=/app/models
USER 10001:10001
EXPOSE 8000
# Liveness, without curl (neither base has it). The port opens once every model is loaded and its
# sessions are created (readiness, /readyz, follows after each instance's warm-up run); the start
# period tolerates the failed checks before that.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DCLGAN_PORT', '8000'), timeout=4)"]
# The service drains on SIGTERM (Docker's default signal too, stated so nobody changes it unawares).
STOPSIGNAL SIGTERM
# Exec form: python is PID 1 and receives SIGTERM itself (a shell wrapper would swallow it).
ENTRYPOINT ["python", "-m", "service"]
