# qcow2-csi developer entry points. `make test` is what CI runs (.ci/run).
GO        ?= go
BIN       := bin/qcow2-csi
PKGS      := ./...
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)

.PHONY: all build deps test test-unit lint bench clean manifests image e2e

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/qcow2-csi

# deps installs what the tests need: Debian packages when root, Go modules.
deps:
	hack/deps.sh

# test: everything CI runs (-race needs cgo: the binary is static, the tests are not). Unit, interop (qemu tools), NBD peers, VM and e2e
# suites are all plain `go test` packages; peers missing under CI=true fail.
test: deps lint build
	$(GO) test -race -count=1 -timeout 60m $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^.cache/')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

bench: deps build
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)
	@for s in tests/bench/*.sh; do [ -x "$$s" ] && echo "== $$s" && "$$s"; done; true

# manifests re-renders deploy/qcow2-csi.yaml from the chart's default values
# (with the helm that hack/e2e/build-tools.sh builds and caches).
manifests:
	hack/e2e/render-manifests.sh deploy/qcow2-csi.yaml

# image builds the driver image as a docker-archive tarball without a
# container engine: bin/qcow2-csi-image.tar (ctr -n k8s.io images import, docker load).
image: build
	$(GO) run ./hack/image -binary $(BIN) -ref ghcr.io/qcow2-csi/qcow2-csi:$(VERSION) -o bin/qcow2-csi-image.tar

# e2e runs only the end-to-end suite on a local control plane (root; see tests/e2e).
e2e: deps
	$(GO) test -count=1 -timeout 40m -v ./tests/e2e/

clean:
	rm -rf bin
