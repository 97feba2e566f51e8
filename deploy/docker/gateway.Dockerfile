# syntax=docker/dockerfile:1
# The gateway (`lorafleet serve`); also the image of the `lorafleet db upgrade` Job. Build from the repository
# root (the context is the whole repository; with BuildKit, gateway.Dockerfile.dockerignore beside this file
# sends only the package's sources):
#   docker build -f deploy/docker/gateway.Dockerfile -t registry.example.com/lorafleet/gateway:0.1.0 .
# No secret is in the image: every setting comes from the environment at run time (LORAFLEET_*).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lorafleet
# torch from PyTorch's CPU index: the gateway runs no model (torch checks uploaded adapters and lays out the base
# on the meta device), and PyPI's build would add gigabytes of CUDA libraries. A constraints file keeps it there
# through `pip install .`. (`==2.13.0` matches the index's 2.13.0+cpu on x86_64 and its plain 2.13.0 on arm64.)
RUN /opt/lorafleet/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && echo 'torch==2.13.0' > /tmp/torch.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lorafleet lorafleet
COPY adapters adapters
COPY serve serve
COPY train train
RUN /opt/lorafleet/bin/pip install -c /tmp/torch.txt .

FROM ${PYTHON_IMAGE}
# A fixed numeric UID, as the pods' securityContext says (runAsUser 10001); HOME is an emptyDir in the pods.
RUN groupadd --gid 10001 lorafleet \
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
EXPOSE 8000 9090
ENTRYPOINT ["lorafleet"]
CMD ["serve"]
