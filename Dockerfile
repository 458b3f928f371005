# bookrec serving image: TorchServe 0.12 serving model-store/bookrec.mar.
#
# Build the archive first, then the image (CPU by default):
#   make archive RUN=runs/bookcrossing
#   make image                        # = serving/build_image.sh: docker build, or buildah without a Docker engine
#   docker build -t bookrec-serve .   # the same with Docker directly
# CUDA base instead (the handler then loads onto cuda:<gpu_id> that TorchServe assigns):
#   docker build -t bookrec-serve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Offline (no package index reachable from the build): serving/build_image.sh --wheels downloads
# every wheel on the host into serving/wheels/ and builds with WHEELS_ONLY=1.
# Run (inference and metrics published; management stays inside the container):
#   docker run -d --name bookrec -p 127.0.0.1:8080:8080 -p 127.0.0.1:8082:8082 bookrec-serve
#   docker exec bookrec cat /home/model-server/key_file.json     # the tokens
# docs/SERVING.md ("Docker image") explains every setting and records a real build.

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS runtime

# Debian 12 and Ubuntu 24.04 both ship a supported Python 3 (3.11 / 3.12) and Java 17 as packages;
# tini forwards docker stop's SIGTERM to the whole process group (CLI, Java frontend, workers);
# curl is for the management API, reachable only from inside (docker exec).
# (slim images lack /usr/share/man/man1, which the JRE's update-alternatives needs.)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv openjdk-17-jre-headless tini ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The venv is built in its own stage so that the wheels copied in for an offline build never
# become a layer of the final image.
FROM runtime AS venv
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# WHEELS_ONLY=1: install from serving/wheels/ alone, no index (serving/build_image.sh --wheels fills it).
ARG WHEELS_ONLY=0
COPY handlers/requirements-serve.txt serving/wheels/ /tmp/install/
RUN case "$WHEELS_ONLY" in \
        1) torch_from="--no-index"; rest_from="--no-index" ;; \
        0) torch_from="--index-url $TORCH_INDEX"; rest_from="" ;; \
        *) echo "WHEELS_ONLY must be 0 or 1, not '$WHEELS_ONLY'" >&2; exit 2 ;; \
    esac \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --find-links /tmp/install $torch_from "torch==${TORCH_VERSION}" \
    && pip install --find-links /tmp/install $rest_from -r /tmp/install/requirements-serve.txt

FROM runtime
COPY --from=venv /opt/venv /opt/venv

# Non-root: TorchServe writes key_file.json and logs/ into its working directory. (uid 1000 is
# taken by "ubuntu" in Ubuntu 24.04 based images.) logs/ exists in the image, owned by the user, so
# that a volume mounted there (docker run -v bookrec-logs:/home/model-server/logs) is writable:
# Docker creates a missing mount point owned by root.
RUN useradd --create-home --home-dir /home/model-server --uid 10001 --shell /usr/sbin/nologin model-server \
    && install -d -o model-server -g model-server /home/model-server/logs
WORKDIR /home/model-server

COPY --chown=model-server:model-server model-store/bookrec.mar model-store/bookrec.mar
COPY --chown=model-server:model-server handlers/log4j2.xml log4j2.xml
COPY --chown=model-server:model-server serving/healthcheck.py healthcheck.py
COPY --chown=model-server:model-server config.properties config.properties.repo

# The repository's config with only what a container needs changed: inference and metrics listen on
# all interfaces so the published ports reach them; management and gRPC stay on loopback (use
# docker exec for the management API); absolute model store and log config paths.
RUN sed -e 's#^inference_address=.*#inference_address=http://0.0.0.0:8080#' \
        -e 's#^metrics_address=.*#metrics_address=http://0.0.0.0:8082#' \
        -e 's#^model_store=.*#model_store=/home/model-server/model-store#' \
        -e 's#-Dlog4j.configurationFile=[^ ]*#-Dlog4j.configurationFile=/home/model-server/log4j2.xml#' \
        config.properties.repo > config.properties \
    && rm config.properties.repo \
    && grep -q '^inference_address=http://0.0.0.0:8080$' config.properties \
    && grep -q '^management_address=http://127.0.0.1:8081$' config.properties \
    && chown model-server:model-server config.properties

USER model-server
# Nothing is fetched at run time: the archive carries the encoder, tokenizer and catalog.
# TS_CONFIG_FILE: the plain `torchserve --start --models bookrec.mar` reads this config, as in the
# repository after `export TS_CONFIG_FILE=$PWD/config.properties`. The handler's request sample for
# the drift check goes to $LOG_LOCATION/drift-sample.w<N>.jsonl (rotated, BOOKREC_DRIFT_* to tune).
ENV TS_CONFIG_FILE=/home/model-server/config.properties \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

EXPOSE 8080 8082

# /ping needs the inference key (token authorization is on); the key file appears once started.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python3", "/home/model-server/healthcheck.py", "--url", "http://127.0.0.1:8080", "--key-file", "/home/model-server/key_file.json"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--models", "bookrec.mar"]
