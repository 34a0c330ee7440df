# Container image of dynsnap (CLI and node agent) on Debian 12, with CRIU >= 4.1 installed as scripts/setup.sh does.
# Build: docker build -t dynsnap:0.1.0 .    Used by the Helm chart in deploy/helm/dynsnap (command: dynsnap agent).

FROM debian:bookworm-slim AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      python3 python3-venv python3-dev gcc g++ make cmake pkg-config \
      liburing-dev libaio-dev libxxhash-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
# CRIU: Debian 12's 3.17 fails on kernels >= 6.13, so, like scripts/setup.sh, Debian 13's 4.1.1 with its own
# libraries and loader in /opt/dynsnap/criu (scripts/criu-bundle.sh).
RUN scripts/criu-bundle.sh /opt/dynsnap/criu
RUN python3 -m venv /opt/dynsnap/venv \
 && /opt/dynsnap/venv/bin/pip install -q --no-cache-dir --upgrade pip setuptools wheel \
 && /opt/dynsnap/venv/bin/pip install -q --no-cache-dir '/src[agent,s3]'

FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 liburing2 libaio1 libxxhash0 ca-certificates \
      util-linux iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/dynsnap /opt/dynsnap
ENV PATH=/opt/dynsnap/venv/bin:$PATH \
    DYNSNAP_CRIU=/opt/dynsnap/criu/bin/criu \
    DYNSNAP_HOME=/var/lib/dynsnap
RUN dynsnap --version && /opt/dynsnap/criu/bin/criu --version
ENTRYPOINT []
CMD ["dynsnap", "agent"]
