# bids_roimae BIDS-App image.
#
#   docker build -t bidsroimae/bids_roimae:0.1.0 .                       # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu124 --build-arg IMAGE_TAG=bidsroimae/bids_roimae:0.1.0-cu124 \
#       -t bidsroimae/bids_roimae:0.1.0-cu124 .
#   docker run --rm --init --read-only --tmpfs /tmp -v /data:/data:ro -v /out:/out \
#       bidsroimae/bids_roimae:0.1.0 /data /out group
#
# Build arguments (docs/containers.md has the details):
#   BASE_IMAGE      python:3.11-slim, or any Debian-like image with python3 + venv
#                   (scripts/make-base-image.sh builds one with debootstrap)
#   TORCH_VARIANT   cpu | cu118 | cu121 | cu124 | cu126 ...: the PyTorch wheel index
#   TORCH_SPEC      the torch requirement (e.g. torch==2.13.0)
#   PIP_INDEX_ARGS  when set, replaces the PyTorch index arguments for the torch install,
#                   e.g. "--index-url https://pypi.org/simple" where only PyPI is reachable
#   IMAGE_TAG       the name:tag given to -t, recorded as the container in the outputs
#   RESOURCES       fetch: download TemplateFlow + AAL3 at build time (bids_roimae-fetch)
#                   copy:  take them from the build context folder build/offline/
#                          (templateflow/ and nilearn_data/), for builds without internet;
#                          wheels in build/offline/wheels/ are offered to pip too
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build

ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC=torch
ARG PIP_INDEX_ARGS=""
ARG RESOURCES=fetch

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NILEARN_DATA=/opt/nilearn_data

# A venv works the same on the official python image and on Debian's python3, where
# PEP 668 forbids installing into the system interpreter.
RUN python3 -m venv /opt/venv

# Optional offline material. The glob keeps this COPY valid when build/offline/ is absent
# (pyproject.toml always matches); the folder's contents land in /tmp/offline/.
COPY pyproject.toml build/offlin[e] /tmp/offline/

# Check what the last steps need before minutes of installs: resources to copy, or a
# reachable TemplateFlow to fetch from; and, for the cpu variant from PyPI's index (whose
# Linux x86_64 torch is the CUDA build), a staged CPU wheel.
RUN set -eu; \
    case "$RESOURCES" in \
      copy) \
        test -d /tmp/offline/templateflow && test -d /tmp/offline/nilearn_data || { \
            echo "RESOURCES=copy needs build/offline/templateflow and" \
                 "build/offline/nilearn_data in the build context" >&2; exit 1; } ;; \
      fetch) \
        printf '%s\n' 'import sys, urllib.request, urllib.error' \
            'url = "https://templateflow.s3.amazonaws.com/"' \
            'try:' '    urllib.request.urlopen(url, timeout=15)' \
            'except urllib.error.HTTPError:' '    pass' \
            'except Exception as exc:' \
            '    sys.exit(f"RESOURCES=fetch needs internet at build time ({url}: {type(exc).__name__}); stage build/offline/ and build with RESOURCES=copy")' \
            | python3 - ;; \
      *) echo "RESOURCES must be fetch or copy, not $RESOURCES" >&2; exit 1 ;; \
    esac; \
    if [ "$TORCH_VARIANT" = cpu ] && [ -n "$PIP_INDEX_ARGS" ] \
       && [ "$(uname -m)" = x86_64 ] \
       && ! ls /tmp/offline/wheels/torch-*+cpu*.whl >/dev/null 2>&1; then \
        echo "TORCH_VARIANT=cpu with PIP_INDEX_ARGS=$PIP_INDEX_ARGS would install PyPI's" \
             "CUDA torch: put a CPU wheel (torch-*+cpu-*.whl) in build/offline/wheels/," \
             "or leave PIP_INDEX_ARGS empty to use the PyTorch cpu index" >&2; exit 1; \
    fi

# torch first, from the index of the chosen variant, so that installing the package below
# finds it satisfied and never pulls the (much larger) default CUDA build.
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    find_links=""; \
    if [ -d /tmp/offline/wheels ]; then find_links="--find-links /tmp/offline/wheels"; fi; \
    if [ -n "$PIP_INDEX_ARGS" ]; then index_args="$PIP_INDEX_ARGS"; \
    else index_args="--index-url https://download.pytorch.org/whl/${TORCH_VARIANT}"; fi; \
    pip install --upgrade pip; \
    pip install $find_links $index_args "$TORCH_SPEC"; \
    python -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit('TORCH_VARIANT=cpu but pip installed a CUDA torch ' + torch.__version__) \
if '${TORCH_VARIANT}' == 'cpu' and torch.version.cuda else None"

# Dependencies before the sources, so that a code change rebuilds only the last layers.
# Only what the package build needs enters the image; tests, docs and data stay out.
COPY pyproject.toml README.md /src/
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    find_links=""; \
    if [ -d /tmp/offline/wheels ]; then find_links="--find-links /tmp/offline/wheels"; fi; \
    python -c "import tomllib; print('\\n'.join(tomllib.load(open('/src/pyproject.toml', \
        'rb'))['project']['dependencies']))" > /tmp/requirements.txt; \
    pip install $find_links -r /tmp/requirements.txt bids-validator-deno
COPY bids_roimae /src/bids_roimae
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    pip install --no-deps /src; \
    pip check

# Template and atlas inside the image, so compute nodes need no internet. With copied
# files present, bids_roimae-fetch only checks that the app finds them.
RUN set -eu; \
    if [ "$RESOURCES" = copy ]; then \
        mkdir -p /opt; \
        cp -a /tmp/offline/templateflow "$TEMPLATEFLOW_HOME"; \
        cp -a /tmp/offline/nilearn_data "$NILEARN_DATA"; \
    fi; \
    bids_roimae-fetch; \
    chmod -R a+rX "$TEMPLATEFLOW_HOME" "$NILEARN_DATA"; \
    rm -rf /tmp/offline /src

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG SOURCE_URL=https://github.com/bidsroimae/bids_roimae
ARG TORCH_VARIANT=cpu
# The name:tag this image is built as (docker/podman build -t ...): recorded in every
# output's dataset_description.json, with the engine that runs it (detected at run time).
ARG IMAGE_TAG=bidsroimae/bids_roimae:${VERSION}

LABEL org.opencontainers.image.title="bids_roimae" \
      org.opencontainers.image.description="BIDS-App: ROI-guided masked-autoencoder pretraining of an fMRI foundation model, fine-tuning and region attribution maps" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.bids-roimae.torch-variant="${TORCH_VARIANT}"

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
COPY --from=build /opt/nilearn_data /opt/nilearn_data

# Runs as any UID on a read-only root: everything that libraries write (matplotlib,
# torch inductor, deno, numba-style caches) goes under /tmp, a tmpfs at run time.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/mpl \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_HOME=/tmp/torch \
    DENO_DIR=/tmp/.cache/deno \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NILEARN_DATA=/opt/nilearn_data \
    OMP_NUM_THREADS=1 \
    BIDS_ROIMAE_CONTAINER_TAG=${IMAGE_TAG} \
    BIDS_ROIMAE_TORCH_VARIANT=${TORCH_VARIANT}

WORKDIR /tmp
USER 65534:65534
ENTRYPOINT ["bids_roimae"]
CMD ["--help"]
