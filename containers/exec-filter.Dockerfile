# Image for the exec_filter *job* under `snakemake --sdm apptainer` (the Docker twin of
# exec-filter.def): the toolchains of sandbox.Dockerfile, bubblewrap, and privcode itself.
# Build from the repository root (exec-filter.Dockerfile.dockerignore keeps the context to
# pyproject.toml and privcode/; BuildKit reads it), push, and point the config at it:
#   docker build -f containers/exec-filter.Dockerfile -t <registry>/privcode-exec-filter:<tag> .
#   docker push <registry>/privcode-exec-filter:<tag>
#   exec_filter: {container_image: "docker://<registry>/privcode-exec-filter:<tag>"}
#   snakemake --sdm apptainer --cores all results/table3.csv
# Snakemake pulls it with apptainer and runs the job in it as the calling user (USER is not used).
# privcode is installed without its dependencies: `privcode exec-filter` needs only the standard
# library and tqdm (tests/test_workflow.py checks this); rebuild after changing privcode/.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-numpy bash util-linux coreutils \
        g++ default-jdk-headless rustc nodejs npm php-cli mono-mcs \
        bubblewrap python3-pip \
    && npm install -g typescript@5 @types/node@20 \
    && npm cache clean --force \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml /opt/privcode/pyproject.toml
COPY privcode /opt/privcode/privcode
RUN pip3 install --no-cache-dir --break-system-packages --no-deps /opt/privcode 'tqdm>=4.66' \
    && rm -rf /opt/privcode \
    && command -v bwrap && privcode exec-filter --help > /dev/null
ENV LANG=C.UTF-8
