# Ludus: the everyday commands. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/ludus
export CARGO_TARGET_DIR ?= $(CACHE)/target
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
ENV = eval "$$(scripts/setup $(1))" &&

.PHONY: setup test demo bench fmt lint

setup:
	scripts/setup

test:
	$(call ENV,--test) LUDUS_REQUIRE_MODEL=1 LUDUS_REQUIRE_TOOLS=1 cargo test --locked

demo:
	$(call ENV,) cargo run --release --locked -- demo --model $(MODEL) --nodes 2

bench:
	$(call ENV,) cargo build --release --locked && $(CARGO_TARGET_DIR)/release/ludus bench decode --model $(MODEL) --threads 2 && cargo bench --locked

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check && cargo clippy --all-targets -- -D warnings

# The CPU node image (packaging/Containerfile.cpu) built with podman from a debootstrap
# base, run against `ludus demo`, one answer through it (needs root and podman).
.PHONY: container-test
container-test:
	$(call ENV,--test) cargo build --locked --bin ludus && LUDUS_BIN=$(CARGO_TARGET_DIR)/debug/ludus scripts/container-node-test
