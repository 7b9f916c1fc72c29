# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml picks the target):
#   server:  the objective server, CPU only: FastAPI, uvicorn, redis-py, and the CPU build of torch
#            with numba for the birdie policy's reward model
#   trainer: the CUDA PyTorch trainer (nvcc included, to build the linear-scan extension)

# --- the objective server -----------------------------------------------------------------------
FROM python:3.11-slim AS server
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies first (cached while only the sources change), then the package itself. torch comes
# from PyTorch's CPU index first: from PyPI, `.[server]` would pull the CUDA build (several GB).
COPY pyproject.toml setup.py README.md ./
RUN pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu \
    && mkdir -p objective_server clients trainer \
    && touch objective_server/__init__.py clients/__init__.py trainer/__init__.py \
    && pip install ".[server,client]" \
    && pip uninstall -y birdie
COPY objective_server ./objective_server
COPY clients ./clients
COPY trainer ./trainer
RUN pip install --no-deps ".[server,client]"
# Not root. /data holds the prepared corpus (the default corpus is prepared there on first start,
# BIRDIE_CACHE) and is a volume in docker-compose.yml.
RUN useradd --create-home --uid 1000 birdie && mkdir -p /data && chown birdie /data
USER birdie
ENV BIRDIE_CACHE=/data/cache \
    BIRDIE_HOST=0.0.0.0 \
    BIRDIE_PORT=8000 \
    NUMBA_CACHE_DIR=/home/birdie/.cache/numba
# The reward model's compiled loops, compiled once here into numba's cache (a few seconds) for the
# installed module (hence `cd /`), so server processes only load them. On a host whose CPU differs
# from the build host's, the first policy update compiles them again into the same, writable, cache.
RUN cd / && python -c "from objective_server.policies.reward_model import warm_up; warm_up()"
EXPOSE 8000
CMD ["birdie-server", "serve", "--preset", "birdie"]

# --- the trainer ---------------------------------------------------------------------------------
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY objective_server ./objective_server
COPY clients ./clients
COPY trainer ./trainer
# The image's CUDA build of torch satisfies the `trainer` extra, so pip keeps it. The linear-scan
# extensions (C++ and CUDA) are compiled here, against that torch, for these GPU generations
# (A100, A10/L4-class, H100), instead of just in time in every new container.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
RUN BIRDIE_BUILD_EXT=1 pip install --no-build-isolation ".[trainer,client]"
VOLUME /checkpoints
CMD ["birdie-train", "--help"]
