# reuseportd build. `make` builds the BPF object, then the Swift products.
#   make            build everything (debug)
#   make run        start the daemon with its built-in demo configuration
#   make test       every test: unit + real-kernel tests + kernel-feature suite (needs root);
#                   REPEAT=N runs it N times in a row, stopping at the first failure (logs kept)
#   make kernel-test  the kernel-feature suite on the running kernel (CHECKS=... picks checks)
#   make vmtest     the same suite in VMs of Debian kernels (KERNELS="5.10 6.1 6.12 testing", KVM=1, BREAK=CHECK)
#   make bench      release build, run the benchmarks, write docs/benchmarks.md (needs root)
#   make unit-check score both units with systemd-analyze security (fails above 4.5; the metrics unit above the daemon's)
#   make install    static release binaries, units, example config, man pages, completions, docs
#                   (PREFIX=/usr/local, DESTDIR=)
#   make deb        the Debian package .output/reuseportd_<version>_amd64.deb; make deb-check lists and checks it
#   make systemd-test  install that package in a Debian root and boot it under systemd in a VM (docs/operations.md)
#   make fuzz       fuzz the config parser and the control decoder (FUZZ_SECONDS=60 each; docs/fuzzing.md)
#   make chaos      random operation sequences: on the placement model (PLACEMENT_SEQUENCES=10000), then on
#                   the real daemon for CHAOS_SECONDS=600 (CHAOS_SEED=N replays)
#   make print-version  the version both binaries and the package get (git commit, -dirty)
#   make records-upgrade-test  reexec from the daemon of the previous records version (bpf/records.h),
#                   built from git history, into this one (a second build: minutes)
#   make V=1 ...    show full commands
.DELETE_ON_ERROR:
.DEFAULT_GOAL := all

OUTPUT      ?= .output
CLANG       ?= clang
OBJCOPY     ?= llvm-objcopy
SWIFT       ?= swift
SWIFT_FLAGS ?=
CONFIG      ?= debug
ARCH        := $(shell uname -m)

ABI_HEADER  := bpf/dispatch.h
# The steering program, the benchmarks' reference programs (baseline) and a program built
# only for the tests (too_large): each bpf/X.bpf.c becomes $(OUTPUT)/X.bpf.o, embedded by
# a C target of the Swift package.
BPF_NAMES   := dispatch baseline too_large
# dispatch.bpf.c again with a part compiled out, for the benchmarks only: without flow tracking
# (untracked: RP_NO_FLOW_TRACKING), and without a flow record's refresh on each pinned packet
# (norefresh: RP_BENCH_NO_REFRESH, what that write and clock read cost).
BENCH_BUILDS := untracked norefresh
BENCH_DEFINE_untracked := RP_NO_FLOW_TRACKING
BENCH_DEFINE_norefresh := RP_BENCH_NO_REFRESH
BPF_OBJS    := $(patsubst %,$(OUTPUT)/%.bpf.o,$(BPF_NAMES)) $(patsubst %,$(OUTPUT)/dispatch_%.bpf.o,$(BENCH_BUILDS))
# bpf/flow_key_cost.bpf.c, rp_dispatch's pinned path alone, for the benchmarks only (item 7: what a
# flow key sized per family would save), twice: with the 40-octet rp_flow_key (shared) and with
# the 16-octet IPv4 key (ipv4: RP_FLOW_KEY_IPV4).
FLOW_KEY_BUILDS := shared ipv4
FLOW_KEY_DEFINE_shared :=
FLOW_KEY_DEFINE_ipv4 := -DRP_FLOW_KEY_IPV4
BPF_OBJS    += $(patsubst %,$(OUTPUT)/flow_key_%.bpf.o,$(FLOW_KEY_BUILDS))
# ... and the steering program as it was at BENCH_REFERENCE, built from git, for the benchmarks'
# paired comparison (item 2). By default 746545c: the last program before QUIC steering and flow
# tracking (ABI 1). Without git or that commit the bench says the reference was not built.
BENCH_REFERENCE ?= 746545c
REFERENCE_DIR := $(OUTPUT)/reference
BPF_OBJS    += $(OUTPUT)/dispatch_reference.bpf.o
BPF_HEADERS := $(wildcard bpf/*.h)
# The C files that #embed the objects (or include the reference's header).
EMBEDDERS   := Sources/CReuseportABI/object.c Sources/CReuseportTestPrograms/object.c Sources/CReuseportBench/object.c \
	Sources/CReuseportBench/reference.c
# Debian packages the build and the tests need (apt names).
APT_PACKAGES := libbpf-dev libelf-dev zlib1g-dev pkg-config bpftool iproute2 socat netcat-openbsd
# ... promtool and a Prometheus server: the metrics endpoint's tests check and scrape it.
APT_PACKAGES += prometheus
# ... Debian's unbound: an unmodified third-party worker the upgrade tests deploy (socket activation,
# sd_notify); the tests run the binary as a worker, not the package's own service.
APT_PACKAGES += unbound
# ... a C compiler: ExampleWorkerTests builds the C example worker (docs/examples/worker.c), and Go
# the Go one (docs/examples/worker.go; standard library only, Debian's Go).
APT_PACKAGES += gcc libc6-dev golang-go
# ... OpenVPN (Debian's 2.6) and ping: BindPreloadOpenVPNTests run unmodified OpenVPN servers as
# workers through the bind preload library, with clients in network namespaces.
APT_PACKAGES += openvpn iputils-ping
# ... and coturn, a STUN/TURN server that binds its own sockets too (BindPreloadCoturnTests); as with
# unbound, the tests run the binary as a worker, not the package's own service.
APT_PACKAGES += coturn
# ... Python's venv and openssl: the QUIC tests run aioquic (from PyPI, into $(QUIC_VENV)) with a
# throwaway certificate.
APT_PACKAGES += python3-venv openssl
# ... and what `make bench` needs on top (gnuplot draws the chart).
BENCH_APT_PACKAGES := gnuplot-nox
# ... and what `make unit-check` needs (systemd-analyze; systemd need not run).
UNIT_APT_PACKAGES := systemd
# ... and what `make vmtest` needs on top.
VM_APT_PACKAGES := qemu-system-x86 busybox-static cpio

# The date of the last commit, for man pages and the package (reproducible: not today's date).
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH
# The version of the package and of both binaries (target `version`): the date and short hash of
# the last commit, and -dirty when a tracked file differs from it (as `git describe --dirty`).
GIT_COMMIT  := $(shell git rev-parse --short HEAD 2>/dev/null || echo 0)
GIT_DIRTY   := $(shell [ -n "$$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo -dirty)
DEB_VERSION ?= 0.1.0~git$(shell date -u -d @$(SOURCE_DATE_EPOCH) +%Y%m%d).$(GIT_COMMIT)$(GIT_DIRTY)

ifeq ($(V),1)
Q =
msg =
else
Q = @
msg = @printf '  %-8s %s\n' "$(1)" "$(2)";
endif

BPF_CFLAGS := -target bpf -O2 -g -Wall -Werror -I/usr/include/$(ARCH)-linux-gnu -Ibpf \
	-fdebug-prefix-map=$(CURDIR)=.

.PHONY: all bpf preload build run test unit-test kernel-test vmtest deps clean help vectors bench unit-check fuzz chaos \
	test-least-privilege records-upgrade-test dist install install-files deb deb-check systemd-test version print-version

all: build

help:
	@sed -n '1,20p' Makefile | sed 's/^# \{0,1\}//'

# Installs what is missing when run as root; otherwise names it and stops.
define apt_install
	$(Q)missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "  APT     installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
		else \
			echo "missing Debian packages:$$missing"; \
			echo "install them with: sudo apt-get install$$missing"; exit 1; \
		fi; \
	fi
endef

deps: $(OUTPUT)/.deps
$(OUTPUT)/.deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(APT_PACKAGES))
	$(Q)command -v $(CLANG) >/dev/null || { echo "no $(CLANG) with the BPF target: the Swift toolchain ships one (/opt/swift/usr/bin)"; exit 1; }
	$(Q)touch $@

# The object is reproducible: -fdebug-prefix-map drops the build folder from the debug
# info, and --strip-debug keeps BTF (which libbpf needs) but drops DWARF.
bpf: $(BPF_OBJS)
$(OUTPUT)/%.bpf.o: bpf/%.bpf.c $(BPF_HEADERS) $(OUTPUT)/.deps
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@.tmp
	$(Q)$(OBJCOPY) --strip-debug $@.tmp $@
	$(Q)rm -f $@.tmp
$(patsubst %,$(OUTPUT)/dispatch_%.bpf.o,$(BENCH_BUILDS)): $(OUTPUT)/dispatch_%.bpf.o: bpf/dispatch.bpf.c $(BPF_HEADERS) \
		$(OUTPUT)/.deps
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -D$(BENCH_DEFINE_$*) -c $< -o $@.tmp
	$(Q)$(OBJCOPY) --strip-debug $@.tmp $@
	$(Q)rm -f $@.tmp
$(patsubst %,$(OUTPUT)/flow_key_%.bpf.o,$(FLOW_KEY_BUILDS)): $(OUTPUT)/flow_key_%.bpf.o: bpf/flow_key_cost.bpf.c \
		$(BPF_HEADERS) $(OUTPUT)/.deps
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) $(FLOW_KEY_DEFINE_$*) -c $< -o $@.tmp
	$(Q)$(OBJCOPY) --strip-debug $@.tmp $@
	$(Q)rm -f $@.tmp

# The bind preload library (preload/bind_preload.c; `preload_bind = true`, docs/configuration.md):
# loaded into workers that bind their own sockets, so it is an ordinary shared object for the
# system's libc, not part of the static daemon. Installed as $(PRELOAD_INSTALLED), where the
# daemon looks for it (beside its own bin/: ../lib/reuseportd/); the tests point the daemon at
# the one built here (REUSEPORTD_PRELOAD_LIBRARY).
CC              ?= cc
PRELOAD_NAME    := libreuseportd-preload.so
PRELOAD_LIB     := $(OUTPUT)/lib/reuseportd/$(PRELOAD_NAME)
PRELOAD_CFLAGS  := -shared -fPIC -O2 -g -Wall -Wextra -Werror -fdebug-prefix-map=$(CURDIR)=.
preload: $(PRELOAD_LIB)
$(PRELOAD_LIB): preload/bind_preload.c $(OUTPUT)/.deps
	$(call msg,CC,$@)
	$(Q)mkdir -p $(dir $@)
	$(Q)$(CC) $(PRELOAD_CFLAGS) -o $@ $< -ldl
# The reference's sources (its bpf/ folder at BENCH_REFERENCE) and a header naming the revision,
# which Sources/CReuseportBench/reference.c includes to write that revision's rp_config. A stamp
# per revision: another BENCH_REFERENCE builds again. An unknown revision leaves an empty object,
# which the bench reports as missing.
$(REFERENCE_DIR)/.rev-$(BENCH_REFERENCE): $(OUTPUT)/.deps
	$(call msg,GIT,$(REFERENCE_DIR) at $(BENCH_REFERENCE))
	$(Q)rm -rf $(REFERENCE_DIR) && mkdir -p $(REFERENCE_DIR)
	$(Q)if git cat-file -e '$(BENCH_REFERENCE):bpf/dispatch.bpf.c' 2>/dev/null; then \
		for file in $$(git ls-tree --name-only '$(BENCH_REFERENCE):bpf/' | grep -E '\.(c|h)$$'); do \
			git show '$(BENCH_REFERENCE):bpf/'"$$file" >$(REFERENCE_DIR)/"$$file" || exit 1; done; \
		printf '#define RP_BENCH_REFERENCE "%s"\n' \
			"$$(git rev-parse --short '$(BENCH_REFERENCE)^{commit}')" >$(REFERENCE_DIR)/revision.h; \
	else echo "  GIT      no $(BENCH_REFERENCE) in git: the bench runs without the reference program"; fi
	$(Q)touch $@
$(OUTPUT)/dispatch_reference.bpf.o: $(REFERENCE_DIR)/.rev-$(BENCH_REFERENCE)
	$(call msg,BPF,$@ ($(BENCH_REFERENCE)))
	$(Q)if [ -f $(REFERENCE_DIR)/dispatch.bpf.c ]; then \
		$(CLANG) $(filter-out -Werror -Ibpf,$(BPF_CFLAGS)) -I$(REFERENCE_DIR) -c $(REFERENCE_DIR)/dispatch.bpf.c \
			-o $@.tmp && $(OBJCOPY) --strip-debug $@.tmp $@ && rm -f $@.tmp; \
	else : >$@; fi

# SwiftPM does not see that the C targets depend on the headers and the objects (it
# reaches them through a relative include and #embed): touch the C files when any
# changes so the Swift side is rebuilt with them. Every build writes the version first.
$(OUTPUT)/.abi-stamp: $(BPF_OBJS) $(BPF_HEADERS) | version
	$(Q)touch $(EMBEDDERS) $@

# The version of this build: the package's (DEB_VERSION: the date and hash of the last commit,
# -dirty when tracked files differ from it), compiled into both binaries (`--version`, the
# daemon's log and status answer) through $(VERSION_HEADER), which Sources/CReuseportVersion
# includes when it exists (a plain `swift build` says "unknown (built without make)"). Written only
# when it changes, and then version.c is touched, as above, for SwiftPM to compile it again.
# `make print-version` prints it.
VERSION_HEADER := $(OUTPUT)/version.h
VERSION_C      := Sources/CReuseportVersion/version.c
version:
	$(Q)mkdir -p $(OUTPUT)
	$(Q)printf '#define RP_VERSION "%s"\n' '$(DEB_VERSION)' >$(VERSION_HEADER).tmp
	$(Q)if cmp -s $(VERSION_HEADER).tmp $(VERSION_HEADER); then rm -f $(VERSION_HEADER).tmp; else \
		mv $(VERSION_HEADER).tmp $(VERSION_HEADER) && touch $(VERSION_C) && \
		printf '  %-8s %s\n' VERSION '$(DEB_VERSION)'; fi

print-version:
	@echo '$(DEB_VERSION)'

build: $(OUTPUT)/.abi-stamp $(PRELOAD_LIB)
	$(call msg,SWIFT,build -c $(CONFIG))
	$(Q)$(SWIFT) build -c $(CONFIG) $(SWIFT_FLAGS)

run: build
	$(Q)$(SWIFT) run -c $(CONFIG) $(SWIFT_FLAGS) reuseportd $(ARGS)

# aioquic for the QUIC tests (Tests/quic/, QuicMigrationTests), from PyPI into a venv of the build
# folder with Debian's Python; the tests are told where it is (REUSEPORT_TEST_PYTHON), and fail,
# rather than skip, when it is missing.
QUIC_VENV     := $(OUTPUT)/venv
QUIC_PACKAGES := aioquic==1.7.2
$(QUIC_VENV)/.stamp: Makefile $(OUTPUT)/.deps
	$(call msg,PIP,$(QUIC_PACKAGES) into $(QUIC_VENV))
	$(Q)rm -rf $(QUIC_VENV) && /usr/bin/python3 -m venv $(QUIC_VENV) && \
		$(QUIC_VENV)/bin/pip install --quiet --disable-pip-version-check $(QUIC_PACKAGES)
	$(Q)touch $@

# How many tests may block at once (Sources/ReuseportTestTraits): the daemon and kernel tests wait
# in poll, waitpid and sleeps, and Swift Testing's own executor has one thread per CPU.
export REUSEPORT_TEST_THREADS ?= 4

# The QUIC migration test runs alone, after the others: its 64 aioquic clients and 4 Python workers
# keep both CPUs busy for some 20 s, which starved the timing-sensitive daemon tests beside it.
QUIC_ALONE := QuicMigrationTests
unit-test: $(OUTPUT)/.abi-stamp $(QUIC_VENV)/.stamp $(PRELOAD_LIB)
	$(call msg,TEST,swift test)
	$(Q)$(SWIFT) test $(SWIFT_FLAGS) --skip $(QUIC_ALONE)
	$(call msg,TEST,swift test --filter $(QUIC_ALONE))
	$(Q)REUSEPORT_TEST_PYTHON=$(CURDIR)/$(QUIC_VENV)/bin/python3 $(SWIFT) test $(SWIFT_FLAGS) --filter $(QUIC_ALONE)

# The kernel-feature suite (Sources/kernel-check) on the running kernel; `make vmtest`
# runs the same suite inside VMs. One line per check; V=1 adds the measured values.
# Its daemon check runs the reuseportd built beside it.
kernel-test: $(OUTPUT)/.abi-stamp
	$(call msg,CHECK,kernel-check on $(shell uname -r))
	$(Q)for product in kernel-check reuseportd; do \
		$(SWIFT) build -c $(CONFIG) $(SWIFT_FLAGS) --product $$product $(if $(Q),>/dev/null) || exit 1; done
	$(Q)"$$($(SWIFT) build -c $(CONFIG) $(SWIFT_FLAGS) --show-bin-path)/kernel-check" \
		$(if $(Q),--no-values) $(CHECKS)

# REPEAT=N runs the whole of `make test` N times in a row and stops at the first failure; each
# run's output is kept in $(TEST_RUNS)/run-<i>.log, and one line per run says how long it took.
REPEAT    ?= 1
TEST_RUNS := $(OUTPUT)/test-runs
ifeq ($(REPEAT),1)
test: unit-test kernel-test
else
test: $(OUTPUT)/.abi-stamp $(QUIC_VENV)/.stamp
	$(Q)rm -rf $(TEST_RUNS) && mkdir -p $(TEST_RUNS)
	$(Q)for i in $$(seq 1 $(REPEAT)); do \
		start=$$(date +%s); \
		if $(MAKE) --no-print-directory test REPEAT=1 >$(TEST_RUNS)/run-$$i.log 2>&1; then \
			echo "  RUN     $$i of $(REPEAT) passed in $$(( $$(date +%s) - start )) s ($(TEST_RUNS)/run-$$i.log)"; \
		else \
			echo "  RUN     $$i of $(REPEAT) FAILED after $$(( $$(date +%s) - start )) s; its log: $(TEST_RUNS)/run-$$i.log"; \
			grep -E "✘|error:|FAIL" $(TEST_RUNS)/run-$$i.log | head -20; exit 1; \
		fi; \
	done
endif

# Random sequences of scale, upgrade, rollback, reload, worker and daemon SIGKILL, reexec and new
# flows on the real daemon, under live UDP flows and TCP connections (Tests/ReuseportDaemonTests/
# ChaosTests.swift), for CHAOS_SECONDS; each sequence prints its seed, CHAOS_SEED=N replays it,
# CHAOS_STEPS sets the steps per sequence. `make test` runs the same for 30 s. First, the placement
# model alone (PlacementModelTests, in process) through PLACEMENT_SEQUENCES random sequences
# (`make test`: 300).
CHAOS_SECONDS ?= 600
CHAOS_STEPS   ?= 15
PLACEMENT_SEQUENCES ?= 10000
chaos: $(OUTPUT)/.abi-stamp
	$(call msg,TEST,$(PLACEMENT_SEQUENCES) random operation sequences on the placement model)
	$(Q)PLACEMENT_SEQUENCES=$(PLACEMENT_SEQUENCES) $(SWIFT) test $(SWIFT_FLAGS) --filter PlacementModelTests
	$(call msg,TEST,chaos sequences for $(CHAOS_SECONDS) s)
	$(Q)CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_STEPS=$(CHAOS_STEPS) $(if $(CHAOS_SEED),CHAOS_SEED=$(CHAOS_SEED)) \
		$(SWIFT) test $(SWIFT_FLAGS) --filter ChaosTests

# The daemon tests with every test daemon holding only the capabilities docs/operations.md
# documents (setpriv lowers its bounding set, as the unit's CapabilityBoundingSet= does).
LEAST_PRIVILEGE := /usr/bin/setpriv --inh-caps=-all --ambient-caps=-all \
	--bounding-set=-all,+bpf,+perfmon,+net_admin,+net_bind_service,+setuid,+setgid,+kill,+sys_ptrace --
test-least-privilege: $(OUTPUT)/.abi-stamp $(QUIC_VENV)/.stamp
	$(call msg,TEST,swift test --filter ReuseportDaemonTests under setpriv)
	$(Q)REUSEPORT_TEST_LAUNCHER="$(LEAST_PRIVILEGE)" $(SWIFT) test $(SWIFT_FLAGS) --filter ReuseportDaemonTests \
		--skip $(QUIC_ALONE)
	$(Q)REUSEPORT_TEST_LAUNCHER="$(LEAST_PRIVILEGE)" REUSEPORT_TEST_PYTHON=$(CURDIR)/$(QUIC_VENV)/bin/python3 \
		$(SWIFT) test $(SWIFT_FLAGS) --filter $(QUIC_ALONE)

# A reexec across a change of the daemon's records (bpf/records.h): the daemon of the last commit
# of the previous RP_RECORDS_VERSION (RECORDS_BASE, found in git history; a git checkout is needed),
# built from `git archive` in $(RECORDS_BASE_DIR) (with our checkouts of its dependencies), runs
# the workers and reexecs into this build's (RecordsVersionTests). A second build: minutes, so not
# part of `make test`.
RECORDS_VERSION  := $(shell sed -n 's/^\#define RP_RECORDS_VERSION //p' bpf/records.h)
RECORDS_BASE     ?= $(shell git log -1 --format=%H -S'define RP_RECORDS_VERSION $(RECORDS_VERSION)' -- bpf/records.h)^
RECORDS_BASE_DIR := $(OUTPUT)/records-base
records-upgrade-test: build
	$(call msg,BUILD,reuseportd of $(RECORDS_BASE) in $(RECORDS_BASE_DIR))
	$(Q)rm -rf $(RECORDS_BASE_DIR) && mkdir -p $(RECORDS_BASE_DIR)
	$(Q)git archive $(RECORDS_BASE) | tar -x -C $(RECORDS_BASE_DIR)
	$(Q)mkdir -p $(RECORDS_BASE_DIR)/.build && cp -a .build/checkouts .build/repositories \
		.build/workspace-state.json $(RECORDS_BASE_DIR)/.build/
	$(Q)if [ -f Package.resolved ]; then cp Package.resolved $(RECORDS_BASE_DIR)/; fi
	$(Q)$(MAKE) -C $(RECORDS_BASE_DIR) build
	$(call msg,TEST,swift test --filter RecordsVersionTests)
	$(Q)REUSEPORT_PREVIOUS_DAEMON=$(abspath $(RECORDS_BASE_DIR))/.build/$(CONFIG)/reuseportd \
		$(SWIFT) test $(SWIFT_FLAGS) --filter RecordsVersionTests

# The suite in VMs (Tests/vm/): fully static kernel-check and reuseportd in a busybox initramfs, booted
# under QEMU on each kernel of KERNELS (Debian cloud kernels, fetched and cached under
# $(VM_DIR)); prints a table kernel x check and fails if a check fails or a VM does not
# report. KVM=1 uses KVM instead of TCG; BREAK=CHECK makes CHECK expect a wrong result.
KERNELS      ?= 5.10 6.1 6.12 testing
VM_DIR       := $(OUTPUT)/vm
STATIC_BUILD := $(OUTPUT)/static-build

$(OUTPUT)/.vm-deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(VM_APT_PACKAGES))
	$(Q)touch $@

VM_PRODUCTS  := kernel-check reuseportd

# Release builds of the products $(1), stripped into folder $(2). $(3) is -static-executable (fully
# static: nothing needed where it runs, as in the VMs; build path $(STATIC_BUILD)) or -static-stdlib
# (the Swift runtime static, the C libraries shared; build path $(STDLIB_BUILD)).
STDLIB_BUILD := $(OUTPUT)/stdlib-build
define release_build
	$(Q)mkdir -p $(2)
	$(Q)for product in $(1); do \
		printf '  %-8s %s\n' SWIFT "build -c release $(3) $$product"; \
		$(SWIFT) build -c release $(SWIFT_FLAGS) -Xswiftc $(3) \
			--build-path $(if $(filter -static-executable,$(3)),$(STATIC_BUILD),$(STDLIB_BUILD)) \
			--product $$product >$(OUTPUT)/release-build.log 2>&1 || { cat $(OUTPUT)/release-build.log; exit 1; }; \
		$(OBJCOPY) --strip-all $(if $(filter -static-executable,$(3)),$(STATIC_BUILD),$(STDLIB_BUILD))/release/$$product \
			$(2)/$$product || exit 1; \
	done
endef

vmtest: $(OUTPUT)/.abi-stamp $(OUTPUT)/.vm-deps
	$(call release_build,$(VM_PRODUCTS),$(VM_DIR)/bin,-static-executable)
	$(call msg,CPIO,$(VM_DIR)/initramfs.cpio.gz)
	$(Q)Tests/vm/mkinitramfs.sh $(VM_DIR)/initramfs.cpio.gz $(addprefix $(VM_DIR)/bin/,$(VM_PRODUCTS))
	$(Q)VM_DIR=$(VM_DIR) V=$(V) KVM=$(KVM) BREAK=$(BREAK) Tests/vm/run.sh $(VM_DIR)/initramfs.cpio.gz $(KERNELS)

# The benchmark suite (Sources/reuseport-bench): release build, then docs/benchmarks.md and
# docs/benchmarks.png from one run. BENCH_ARGS passes options (e.g. --quick).
$(OUTPUT)/.bench-deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(BENCH_APT_PACKAGES))
	$(Q)touch $@

bench: $(OUTPUT)/.abi-stamp $(OUTPUT)/.bench-deps
	$(call msg,SWIFT,build -c release)
	$(Q)start=$$(date +%s); $(SWIFT) build -c release $(SWIFT_FLAGS) && \
		"$$($(SWIFT) build -c release $(SWIFT_FLAGS) --show-bin-path)/reuseport-bench" \
		--output docs/benchmarks.md --build-seconds $$(( $$(date +%s) - start )) $(BENCH_ARGS)

# The units' exposure as systemd-analyze scores it offline (docs/operations.md, "Sandboxing"):
# fails when the daemon's unit is above UNIT_MAX_EXPOSURE, or the metrics unit above the daemon
# unit's score (it needs less). Prints both scores; each unit's full table, with what it leaves
# exposed (✗), is kept in $(UNIT_REPORTS)/<unit>.txt.
UNIT_FILE         := dist/reuseportd.service
METRICS_UNIT_FILE := dist/reuseportd-metrics.service
UNIT_MAX_EXPOSURE := 4.5
UNIT_REPORTS      := $(OUTPUT)/unit-check

$(OUTPUT)/.unit-deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(UNIT_APT_PACKAGES))
	$(Q)touch $@

# $(call unit_score,UNIT,MAX,WHY): scores UNIT into $$score, prints it, fails above MAX.
define unit_score
	report=$(UNIT_REPORTS)/$$(basename $(1)).txt; \
	systemd-analyze security --offline=true --no-pager $(1) >$$report 2>&1; \
	score=$$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\1/p' $$report); \
	level=$$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\2/p' $$report); \
	if [ -z "$$score" ]; then cat $$report; exit 1; fi; \
	$(if $(Q),,cat $$report;) \
	if awk "BEGIN { exit !($$score > $(2)) }"; then \
		grep '✗' $$report; \
		echo "$(1): exposure $$score $$level, above $(2) ($(3))"; exit 1; \
	fi; \
	echo "  $(1): exposure $$score $$level (at most $(2), $(3); $$report)"
endef

unit-check: $(OUTPUT)/.unit-deps
	$(call msg,ANALYZE,$(UNIT_FILE) $(METRICS_UNIT_FILE))
	$(Q)mkdir -p $(UNIT_REPORTS); \
		echo "  $$(systemd-analyze --version | head -1), systemd-analyze security --offline=true"; \
		$(call unit_score,$(UNIT_FILE),$(UNIT_MAX_EXPOSURE),UNIT_MAX_EXPOSURE); \
		daemon=$$score; \
		$(call unit_score,$(METRICS_UNIT_FILE),$$daemon,the daemon unit's score)

# What `make install` and `make deb` ship, made in $(DIST_DIR): reuseportd fully static (it runs
# on any Linux, with nothing else installed); reuseportctl with the Swift runtime static but libc,
# libbpf, libelf, zlib and libcurl shared (its metrics server, FlyingFox, links FoundationNetworking,
# and libcurl has no complete static build in Debian: the package depends on them); man pages
# from swift-argument-parser's generate-manual plugin (it builds every product in debug, which
# `make build` has mostly done, and runs each with --experimental-dump-help; it needs no network);
# bash, zsh and fish completions from --generate-completion-script.
DIST_DIR      := $(OUTPUT)/dist
# The man pages are finished by dist/man/finish.awk: these internal subcommands left out (the plugin
# lists them although they are hidden from --help), and EXIT STATUS from dist/man/<product>.exit-status.
MAN_HIDDEN    := exec-worker check-config
DIST_PRODUCTS := reuseportd reuseportctl
MAN_DATE      := $(shell date -u -d @$(SOURCE_DATE_EPOCH) +%Y-%m-%d)

# libcurl's development link (-lcurl) for reuseportctl's FoundationNetworking; man for deb-check.
DIST_APT_PACKAGES := libcurl4-openssl-dev man-db

$(OUTPUT)/.dist-deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(DIST_APT_PACKAGES))
	$(Q)touch $@

dist: $(OUTPUT)/.abi-stamp $(OUTPUT)/.dist-deps $(PRELOAD_LIB)
	$(call release_build,reuseportd,$(DIST_DIR)/bin,-static-executable)
	$(call release_build,reuseportctl,$(DIST_DIR)/bin,-static-stdlib)
	$(call msg,MAN,generate-manual plugin)
	$(Q)mkdir -p $(DIST_DIR)/man $(DIST_DIR)/completions
	$(Q)$(SWIFT) package $(SWIFT_FLAGS) plugin generate-manual --configuration debug --section 8 --date $(MAN_DATE) \
		>$(OUTPUT)/generate-manual.log 2>&1 || { cat $(OUTPUT)/generate-manual.log; exit 1; }
	$(Q)for product in $(DIST_PRODUCTS); do \
		awk -v HIDDEN="$(MAN_HIDDEN)" -v EXIT=dist/man/$$product.exit-status -f dist/man/finish.awk \
			.build/plugins/GenerateManual/outputs/$$product/$$product.8 >$(DIST_DIR)/man/$$product.8 && \
			gzip -9nf $(DIST_DIR)/man/$$product.8 || exit 1; \
		for shell in bash zsh fish; do \
			$(DIST_DIR)/bin/$$product --generate-completion-script $$shell >$(DIST_DIR)/completions/$$product.$$shell \
				|| exit 1; \
		done; \
	done

# `make install` (PREFIX, DESTDIR). The units name /usr/bin and /usr/share/doc (the package's
# paths): they are rewritten for PREFIX. The configuration has one path whatever the PREFIX,
# /etc/reuseportd/reuseportd.toml (the units, the docs and the package name it; SYSCONFDIR=
# moves it, and the units with it). An existing configuration file is never replaced.
PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      := $(PREFIX)/bin
PRELOADDIR  := $(PREFIX)/lib/reuseportd
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(PREFIX)/lib/systemd/system
MANDIR      := $(PREFIX)/share/man
DOCDIR      := $(PREFIX)/share/doc/reuseportd
COMPLETIONS := bash:share/bash-completion/completions/% zsh:share/zsh/vendor-completions/_% \
	fish:share/fish/vendor_completions.d/%.fish
UNITS       := dist/reuseportd.service dist/reuseportd-metrics.service
# Every doc, flat in DOCDIR (README.md beside the rest); DOC_LINKS rewrites the links that cross the
# source tree's folders so that they resolve there (README's docs/X, the docs' ../README.md, the units
# under ../dist, which are installed in UNITDIR: ../../../lib/systemd/system from DOCDIR). make deb-check
# checks every relative link of the installed docs (Tests/systemd-vm/check-doc-links.py).
DOCS        := README.md $(wildcard docs/*.md) docs/benchmarks.png
DOC_LINKS   := -e 's|](docs/|](|g' -e 's|](\.\./README\.md|](README.md|g' \
	-e 's|](\.\./dist/\(reuseportd[a-z-]*\.service\)|](../../../lib/systemd/system/\1|g'
# The example workers and configurations (docs/examples: C, Python and Go workers, which ExampleWorkerTests
# runs as workers; the QUIC service docs/cli.md's examples run against).
EXAMPLES    := docs/examples/worker.c docs/examples/worker.py docs/examples/worker.go docs/examples/quic.toml
UNIT_PATHS  := -e 's|/usr/bin/|$(BINDIR)/|g' -e 's|/etc/reuseportd/|$(SYSCONFDIR)/reuseportd/|g' \
	-e 's|/usr/share/doc/reuseportd/|$(DOCDIR)/|g'

install: dist install-files

# What `install` copies, without building `dist` again (`make deb` calls it after `dist`).
install-files:
	$(call msg,INSTALL,$(DESTDIR)$(PREFIX))
	$(Q)install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/reuseportd \
		$(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR)
	$(Q)install -m 0755 $(addprefix $(DIST_DIR)/bin/,$(DIST_PRODUCTS)) $(DESTDIR)$(BINDIR)/
	$(Q)install -D -m 0644 $(PRELOAD_LIB) $(DESTDIR)$(PRELOADDIR)/$(PRELOAD_NAME)
	$(Q)for unit in $(UNITS); do \
		sed $(UNIT_PATHS) $$unit >$(DESTDIR)$(UNITDIR)/$$(basename $$unit) && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$unit) || exit 1; \
	done
	$(Q)[ -e $(DESTDIR)$(SYSCONFDIR)/reuseportd/reuseportd.toml ] || \
		install -m 0644 dist/reuseportd.toml $(DESTDIR)$(SYSCONFDIR)/reuseportd/reuseportd.toml
	$(Q)for page in $(DIST_DIR)/man/*.8.gz; do \
		zcat $$page | sed $(UNIT_PATHS) | gzip -9n >$(DESTDIR)$(MANDIR)/man8/$$(basename $$page) && \
		chmod 0644 $(DESTDIR)$(MANDIR)/man8/$$(basename $$page) || exit 1; \
	done
	$(Q)for product in $(DIST_PRODUCTS); do for entry in $(COMPLETIONS); do \
		shell=$${entry%%:*}; path=$(DESTDIR)$(PREFIX)/$$(echo $${entry#*:} | sed "s/%/$$product/"); \
		install -D -m 0644 $(DIST_DIR)/completions/$$product.$$shell $$path || exit 1; \
	done; done
	$(Q)for doc in $(DOCS); do \
		case $$doc in *.md) sed $(DOC_LINKS) $$doc >$(DESTDIR)$(DOCDIR)/$$(basename $$doc) && \
			chmod 0644 $(DESTDIR)$(DOCDIR)/$$(basename $$doc) || exit 1;; \
		*) install -m 0644 $$doc $(DESTDIR)$(DOCDIR)/ || exit 1;; esac; \
	done
	$(Q)install -d $(DESTDIR)$(DOCDIR)/examples && install -m 0644 $(EXAMPLES) $(DESTDIR)$(DOCDIR)/examples/

# `make deb`: the package, with dpkg-deb (no debhelper): `make install` with PREFIX=/usr into a
# staging root, plus control, conffiles, md5sums, copyright and maintainer scripts from dist/debian/.
# Its version, DEB_VERSION, is the one the binaries were built with (defined above, at `version`).
DEB_ARCH    := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB_ROOT    := $(OUTPUT)/deb/root
DEB_FILE    := $(OUTPUT)/reuseportd_$(DEB_VERSION)_$(DEB_ARCH).deb

deb: dist
	$(Q)rm -rf $(DEB_ROOT) && mkdir -p $(DEB_ROOT)/DEBIAN
	$(Q)$(MAKE) --no-print-directory install-files PREFIX=/usr DESTDIR=$(DEB_ROOT) UNITDIR=/usr/lib/systemd/system
	$(Q)install -m 0644 dist/debian/copyright $(DEB_ROOT)/usr/share/doc/reuseportd/copyright
	$(Q)sed -e 's/@VERSION@/$(DEB_VERSION)/' -e 's/@DATE@/$(shell date -u -R -d @$(SOURCE_DATE_EPOCH))/' \
		dist/debian/changelog | gzip -9n >$(DEB_ROOT)/usr/share/doc/reuseportd/changelog.Debian.gz
	$(Q)install -m 0644 dist/debian/conffiles $(DEB_ROOT)/DEBIAN/
	$(Q)install -m 0755 dist/debian/postinst dist/debian/prerm dist/debian/postrm $(DEB_ROOT)/DEBIAN/
	$(Q)sed -e 's/@VERSION@/$(DEB_VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' \
		-e "s/@SIZE@/$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1)/" dist/debian/control >$(DEB_ROOT)/DEBIAN/control
	$(Q)(cd $(DEB_ROOT) && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | \
		xargs -0 md5sum) >$(DEB_ROOT)/DEBIAN/md5sums
	$(Q)find $(DEB_ROOT) -exec touch -h -d @$(SOURCE_DATE_EPOCH) {} +
	$(call msg,DEB,$(DEB_FILE))
	$(Q)dpkg-deb --root-owner-group -Zgzip --build $(DEB_ROOT) $(DEB_FILE) >/dev/null

# The package as a user gets it: its file list and control fields hold what README promises, the
# configuration is a conffile, the binaries run (the daemon fully static). lintian too, when installed.
deb-check: deb
	$(call msg,CHECK,$(DEB_FILE))
	$(Q)DEB_FILE=$(DEB_FILE) Tests/systemd-vm/check-deb.sh

# reuseportd under a real systemd as PID 1 (Tests/systemd-vm/run.sh): a Debian root made with
# mmdebstrap (cached in $(OUTPUT)/systemd-vm), the package installed in it with dpkg, booted under
# QEMU (TCG) with a Debian cloud kernel; start, reload, the watchdog, the journal and stop are
# checked with systemctl. SUITE= picks the root's Debian suite (trixie: systemd 257).
SYSTEMD_VM_APT_PACKAGES := mmdebstrap qemu-system-x86 cpio

$(OUTPUT)/.systemd-vm-deps: Makefile
	$(Q)mkdir -p $(OUTPUT)
	$(call apt_install,$(SYSTEMD_VM_APT_PACKAGES))
	$(Q)touch $@

systemd-test: deb-check $(OUTPUT)/.systemd-vm-deps
	$(Q)VM_DIR=$(OUTPUT)/systemd-vm V=$(V) KVM=$(KVM) Tests/systemd-vm/run.sh $(DEB_FILE)

# Coverage-guided fuzzing (libFuzzer with AddressSanitizer; docs/fuzzing.md) of the two inputs
# from outside the root daemon: the configuration parser (fuzz-config) and the control request
# decoder with the daemon's check of a request (fuzz-control), FUZZ_SECONDS each. Built in their
# own build path: -sanitize=fuzzer must not reach the normal build. Each starts from the
# committed seeds (Tests/fuzz/corpus/NAME) and keeps what it finds in $(FUZZ_DIR)/corpus/NAME;
# a crash fails the target and leaves its input in $(FUZZ_DIR)/crashes/NAME/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := config control
FUZZ_BUILD   := .build-fuzz
FUZZ_DIR     := $(OUTPUT)/fuzz
# TOMLKit never frees the tables it parses (docs/fuzzing.md): no leak checking. The Swift
# runtime's backtracer is off: AddressSanitizer and libFuzzer report a crash themselves.
FUZZ_FLAGS   := -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -timeout=10 -detect_leaks=0 -print_final_stats=1
FUZZ_ENV     := SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=detect_leaks=0

fuzz: $(OUTPUT)/.abi-stamp
	$(Q)for target in $(FUZZ_TARGETS); do \
		printf '  %-8s %s\n' SWIFT "build -sanitize=fuzzer,address fuzz-$$target"; \
		$(SWIFT) build -c debug $(SWIFT_FLAGS) --build-path $(FUZZ_BUILD) --product fuzz-$$target \
			-Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xcxx -fsanitize=fuzzer-no-link,address \
			$(if $(Q),>$(OUTPUT)/fuzz-build.log 2>&1 || { cat $(OUTPUT)/fuzz-build.log; exit 1; },|| exit 1); \
	done
	$(Q)failed=""; for target in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_DIR)/corpus/$$target $(FUZZ_DIR)/crashes/$$target; \
		printf '  %-8s %s\n' FUZZ "$$target for $(FUZZ_SECONDS) s (log: $(FUZZ_DIR)/$$target.log)"; \
		$(FUZZ_ENV) $(FUZZ_BUILD)/debug/fuzz-$$target $(FUZZ_FLAGS) -dict=Tests/fuzz/$$target.dict \
			-artifact_prefix=$(FUZZ_DIR)/crashes/$$target/ $(FUZZ_DIR)/corpus/$$target Tests/fuzz/corpus/$$target \
			>$(FUZZ_DIR)/$$target.log 2>&1 || failed="$$failed $$target"; \
		grep -E '^stat::(number_of_executed_units|peak_rss_mb)' $(FUZZ_DIR)/$$target.log | tail -n 2 | \
			sed 's/^/           /'; \
	done; \
	if [ -n "$$failed" ]; then \
		for target in $$failed; do \
			echo "fuzz-$$target failed: inputs in $(FUZZ_DIR)/crashes/$$target/, log $(FUZZ_DIR)/$$target.log"; \
			ls $(FUZZ_DIR)/crashes/$$target/; \
		done; exit 1; \
	fi

clean:
	$(call msg,CLEAN,$(OUTPUT) .build)
	$(Q)rm -rf $(OUTPUT) .build

# Flow-hash test vectors from the C hash in the ABI header (checked in; the Swift tests
# hold the Swift implementation to them).
vectors: bpf/testdata/flow-hash-vectors.txt
bpf/testdata/flow-hash-vectors.txt: bpf/testdata/flow-hash-vectors.c $(ABI_HEADER)
	$(call msg,GEN,$@)
	$(Q)$(CLANG) -O2 -Wall -Werror -o $(OUTPUT)/flow-hash-vectors $< && $(OUTPUT)/flow-hash-vectors > $@
