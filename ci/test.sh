#!/usr/bin/env bash
# hvbench's test command: installs the system packages the tests use (when missing and
# allowed), then checks formatting and lints and runs every test. CI runs it through
# .ci/run; on a fresh machine it is all the set-up the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
# check-jsonschema (PyPI, below) validates .github/workflows against GitHub's schema.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
# libvirt for --backend libvirt: the daemon, its QEMU driver and virsh (the tests start
# the daemons themselves; these machines have no service manager).
command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon)
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] \
    || need+=(libvirt-daemon-driver-qemu)
# sshd for the qemu+ssh:// libvirt test (the test starts its own on a free port).
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v fio >/dev/null 2>&1 || need+=(fio)
# The Xen lab test builds the hypervisor from Debian's xen source (once per machine).
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
command -v bison >/dev/null 2>&1 || need+=(bison)
command -v flex >/dev/null 2>&1 || need+=(flex)
command -v make >/dev/null 2>&1 || need+=(make)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ci/test.sh: missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    echo "ci/test.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# check-jsonschema, into a virtual environment of its own (Debian's Python refuses
# system-wide pip installs): it carries the published GitHub Actions workflow schema.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/hvbench/venv"
if ! command -v check-jsonschema >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/check-jsonschema" ]; then
        echo "ci/test.sh: installing check-jsonschema into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q check-jsonschema
    fi
    export PATH="$venv/bin:$PATH"
fi

# libvirt's QEMU driver refuses to start without the user it runs guests as, which
# Debian's libvirt-daemon-system would create (with much more): create it alone.
if [ "$(id -u)" -eq 0 ] && ! id libvirt-qemu >/dev/null 2>&1; then
    getent group kvm >/dev/null || groupadd -r kvm
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
fi

# Tests that need /dev/kvm, QEMU, a browser or the Xen lab fail instead of skipping when
# these are set. The Xen lab test deploys Xen nested in QEMU (packages from Debian's
# registry, cached in ~/.cache/hvbench/lab) with a hypervisor built from Debian's xen
# source with shadow paging (about 2-5 minutes the first time on a machine, then cached)
# and the instruction-count plugin, and takes it down again.
# The KVM lab test (run only when HVBENCH_REQUIRE_KVM_LAB=1) deploys Linux nested in QEMU,
# runs the memory workloads with kvm_amd npt=1 and npt=0 there, and takes it down (~20 s).
# The libvirt tests start libvirtd and virtlogd where no libvirt answers, and stop them.
export HVBENCH_REQUIRE_LIBVIRT=1
export HVBENCH_REQUIRE_KVM=1 HVBENCH_REQUIRE_QEMU=1 HVBENCH_REQUIRE_BROWSER=1 HVBENCH_REQUIRE_XEN_LAB=1
export HVBENCH_REQUIRE_KVM_LAB=1 HVBENCH_REQUIRE_WORKFLOW_SCHEMA=1
# The matrix end-to-end test runs the Xen lab as a matrix host too (about 80 s).
# sched_xen.rs's fairness test boots a 3-CPU lab and two busy domains (40-55 s).
# The Xen migration test (xen_migration.rs) brings the lab up with --insns and
# `xl migrate`s a 32 MiB guest there (40-160 s with the lab up, by load).
export HVBENCH_MATRIX_XEN_LAB=1

cargo fmt --all -- --check
(cd guests && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
(cd guests && cargo clippy --release -- -D warnings)
# The QEMU plugin is a cdylib nothing links: build it before the tests load it.
cargo build -p hvbench-insns-plugin
cargo test --workspace
