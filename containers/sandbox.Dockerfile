# Execution-filter sandbox image: toolchains for the languages of generated code, no project files.
#   docker build -f containers/sandbox.Dockerfile -t privcode-sandbox .
# Runs untrusted snippets as an unprivileged user; the exec filter adds --network none and rlimits.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-numpy bash g++ default-jdk-headless rustc nodejs npm php-cli mono-devel \
    && npm install -g typescript@5 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 65534 --no-create-home --shell /usr/sbin/nologin sandbox 2>/dev/null || true
USER 65534:65534
WORKDIR /tmp
