# Execution-filter sandbox image (backend "container"): toolchains for the languages of generated
# code, no project files.
#   docker build -f containers/sandbox.Dockerfile -t privcode-sandbox containers
#   (podman build ... likewise; PRIVCODE_SANDBOX_IMAGE overrides the tag the filter looks for)
# The exec filter runs privcode.sandbox.server under /usr/bin/python3 in it, as uid 65534, with
# --network none --read-only --cap-drop ALL --security-opt no-new-privileges --pids-limit --memory
# and a size-limited /tmp tmpfs; snippets are compiled and run inside (see docs/sandbox.md).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-numpy bash util-linux coreutils \
        g++ default-jdk-headless rustc nodejs npm php-cli mono-mcs \
    && npm install -g typescript@5 @types/node@20 \
    && npm cache clean --force \
    && rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*
RUN useradd --uid 65534 --no-create-home --shell /usr/sbin/nologin sandbox 2>/dev/null || true
USER 65534:65534
WORKDIR /tmp
