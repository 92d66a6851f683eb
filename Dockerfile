# qcow2-csi container image for users with a Docker engine or buildkit:
#   docker build -t ghcr.io/qcow2-csi/qcow2-csi:dev .
# The same image can be built without an engine (what the e2e suite does):
#   make image     -> bin/qcow2-csi-image.tar, load with `ctr -n k8s.io images import`
#
# The driver is statically linked; the runtime stage carries the filesystem
# and block tools it calls: mkfs/fsck/resize for ext4 and xfs, blkid, mount,
# losetup/blockdev (fallback attach backend), fusermount3.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/qcow2-csi ./cmd/qcow2-csi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/qcow2-csi /usr/bin/qcow2-csi
ENTRYPOINT ["/usr/bin/qcow2-csi"]
