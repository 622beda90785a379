#!/usr/bin/env bash
# The package test (run by tests/run.sh, as root): build the .deb from the debug build, install
# it with dpkg -i, check what a user gets (binaries on PATH, man pages, completions, the system
# user, the units), remove and purge it, and check it is gone.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "deploy/deb/test.sh must run as root (dpkg -i)" >&2; exit 1; }
fail() { echo "package test FAILED: $*" >&2; exit 1; }
if dpkg -s walvault >/dev/null 2>&1; then fail "a walvault package is already installed; remove it first (dpkg -P walvault)"; fi
deb=$(deploy/deb/build.sh --profile dev | tail -1)
echo "built $deb ($(du -h "$deb" | cut -f1))"
dpkg -i "$deb" >/dev/null
trap 'dpkg -P walvault >/dev/null 2>&1 || true' EXIT
/usr/bin/walvault-agent --version | grep -q '^walvault-agent ' || fail "walvault-agent --version"
/usr/bin/walvault-recover --version | grep -q '^walvault-recover ' || fail "walvault-recover --version"
man -w walvault-agent | grep -q '/usr/share/man/man1/walvault-agent.1' || fail "man -w walvault-agent"
man -w walvault-recover >/dev/null || fail "man -w walvault-recover"
zcat /usr/share/man/man1/walvault-recover.1.gz | grep -q 'restore' || fail "the man page describes the subcommands"
grep -q 'walvault-agent' /usr/share/bash-completion/completions/walvault-agent || fail "bash completion"
[ -f /usr/share/zsh/vendor-completions/_walvault-recover ] || fail "zsh completion"
getent passwd walvault >/dev/null || fail "the walvault system user was not created"
[ "$(stat -c %U /var/lib/walvault)" = walvault ] || fail "/var/lib/walvault is not the walvault user's"
grep -q '^ExecStart=/usr/bin/walvault-agent run' /lib/systemd/system/walvault-agent.service || fail "the agent's unit"
grep -q '^Type=notify' /lib/systemd/system/walvault-agent.service || fail "Type=notify"
dpkg -P walvault >/dev/null
trap - EXIT
[ ! -e /usr/bin/walvault-agent ] || fail "walvault-agent still installed after purge"
! getent passwd walvault >/dev/null || fail "the walvault user remains after purge"
echo "package test passed: installed, checked, purged"
