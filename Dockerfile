# syntax=docker/dockerfile:1
# MWM image: one console script, `mwm`, for every role:
#   mwm api | mwm gateway | mwm consume discovery|scheduler|monitor|exporter
# Build:  docker build -t <registry>/mwm:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: install the project and its dependencies into a virtualenv at /opt/venv
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that this layer survives source changes.
COPY pyproject.toml ./
# The image runs the Argo engine too: its extra's dependencies go in with the core ones.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['argo']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt

# Then the project itself (.dockerignore lets in only pyproject.toml, README.md and the packages).
COPY . ./
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/*.whl \
    && mwm --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime: the virtualenv on a clean python:3.11-slim, running as uid 10001
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mwm" \
      org.opencontainers.image.description="MWM: event-driven workload manager for medical-imaging AI" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 mwm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mwm --shell /usr/sbin/nologin mwm \
    && mkdir -p /var/lib/mwm/work \
    && chown -R 10001:10001 /var/lib/mwm

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MWM_WORK_DIR=/var/lib/mwm/work \
    MWM_OBSERVABILITY__HTTP_HOST=0.0.0.0

WORKDIR /var/lib/mwm
USER 10001:10001

# 8000: REST API, 9100: /healthz /readyz /metrics, 11112: DICOM C-STORE SCP
EXPOSE 8000 9100 11112

ENTRYPOINT ["mwm"]
CMD ["--help"]
