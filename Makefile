# sevpn: a layer-2 VPN on Twisted.  Run as root on Debian.
#   make demo   set everything up and show a hub with two cards at work
#   make demo-fabric  two hub nodes serving one virtual hub (VXLAN + BGP-EVPN with FRR), a card on each
#   make test   the whole trial suite (unit and namespace system tests)
#   make bench  throughput and latency through the VPN beside bare veth

VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := $(shell find sevpn twisted -name '*.py') setup.cfg pyproject.toml

.PHONY: all demo demo-fabric test bench bench-fabric bench-workers soak system-deps install clean

all: install

# OS tools the demo, the tests and the benchmark drive (command:package):
# namespaces and traffic; real programs the system tests meet (proxies,
# DHCP, FRR, PostgreSQL for the shared user store, a browser, systemd's
# analyzer); the WAN emulator's compiler.  PostgreSQL's server tools live
# in /usr/lib/postgresql/VERSION/bin, looked in too.
SYSTEM_TOOLS := ip:iproute2 ss:iproute2 bridge:iproute2 ping:iputils-ping iperf3:iperf3 \
	ethtool:ethtool cc:gcc openssl:openssl useradd:passwd unshare:util-linux runuser:util-linux \
	tinyproxy:tinyproxy danted:dante-server squid:squid \
	dnsmasq:dnsmasq-base dhclient:isc-dhcp-client \
	bgpd:frr vtysh:frr initdb:postgresql pg_ctl:postgresql chromium:chromium systemd-analyze:systemd
system-deps:
	@missing=""; pgbin=$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tr '\n' ':'); \
	for tool in $(SYSTEM_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin:/usr/lib/frr:$$pgbin" command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  policy=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod +x /usr/sbin/policy-rc.d; policy=1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; status=$$?; \
	  [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	  exit $$status; \
	fi

# A plain (non-editable) install, as users get it; redone when sources change.
# constraints.txt pins the versions the suite was last run with (sevpn/tls.py
# leans on Twisted internals): update it deliberately, after a green run.
install: $(VENV)/.installed
$(VENV)/.installed: $(SOURCES) constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt . hypothesis
	@touch $@

demo: system-deps install
	$(PY) scripts/demo.py

demo-fabric: system-deps install
	$(PY) scripts/fabric_demo.py

test: system-deps install
	$(PY) -m twisted.trial tests

bench: system-deps install
	$(PY) scripts/bench.py

# Cards on two hub nodes (VXLAN between them) beside cards on one node.
bench-fabric: system-deps install
	$(PY) scripts/bench_fabric.py

# What --workers buys: PAIRS card pairs at once through 1 and each of WORKERS
# hub workers (make bench-workers WORKERS=1,2 DUR=10 PAIRS=2); the ratio.
bench-workers: system-deps install
	$(PY) scripts/bench_workers.py

# Ten minutes of chaos (cuts, restarts, a hostile user) under honest traffic; not in CI.
soak: system-deps install
	$(PY) scripts/soak.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .hypothesis

# --- A system installation (as root; see docs/deploy.md) ----------------------
# A venv in PREFIX held to constraints.txt, the commands linked into BINDIR,
# the systemd units, their defaults files (an edited one is kept; the
# shipped one lands beside it as .dist), and the system user sevpn the hub
# runs as.  Running it again upgrades: the venv is made afresh and running
# units are restarted.  DESTDIR stages everything under another root (the
# tests do): no user is made and systemd is not told; a venv is not
# relocatable, so a staged one runs only where it was staged.
# uninstall-system removes all that but keeps the state (/var/lib/sevpn),
# the user sevpn, defaults files an operator edited and unit drop-ins.
PREFIX        ?= /opt/sevpn
BINDIR        ?= /usr/local/bin
UNITDIR       ?= /etc/systemd/system
DEFAULTDIR    ?= /etc/default
SYSTEM_PYTHON ?= /usr/bin/python3
SYSTEM_COMMANDS := sevpn sevpn-hub sevpn-nic twistd
SYSTEM_UNITS    := $(notdir $(wildcard etc/systemd/*.service))
SYSTEM_DEFAULTS := $(notdir $(wildcard etc/default/*))
# Shell snippets: who may run this, and whether systemd is running (sd_booted).
SYSTEM_CHECKS = \
	if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make $@: run it as root (or stage it with DESTDIR=DIR)" >&2; exit 1; fi; \
	case "$(PREFIX)" in /?*) ;; *) echo "make $@: PREFIX must be an absolute path, not '$(PREFIX)'" >&2; exit 1;; esac; \
	if [ -n "$(DESTDIR)" ]; then systemd=""; \
	elif [ -d /run/systemd/system ]; then systemd=yes; \
	else systemd=""; echo "systemd is not running here (PID 1 is $$(cat /proc/1/comm 2>/dev/null)): not calling systemctl"; fi

.PHONY: install-system uninstall-system

install-system:
	@set -e; umask 022; $(SYSTEM_CHECKS); \
	venv="$(DESTDIR)$(PREFIX)"; \
	if [ -e "$$venv" ] && [ ! -e "$$venv/.sevpn-venv" ]; then \
	  echo "make $@: $$venv exists and is not a sevpn installation; choose another PREFIX" >&2; exit 1; fi; \
	for cmd in $(SYSTEM_COMMANDS); do \
	  link="$(DESTDIR)$(BINDIR)/$$cmd"; \
	  if { [ -e "$$link" ] || [ -L "$$link" ]; } && [ "$$(readlink "$$link")" != "$(PREFIX)/bin/$$cmd" ] && [ $$cmd != twistd ]; then \
	    echo "make $@: $$link is not a link to $(PREFIX)/bin/$$cmd; remove it (an older pip install?) or choose BINDIR" >&2; exit 1; fi; \
	done; \
	if ! $(SYSTEM_PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  echo "installing: python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; fi; \
	echo "making the venv $$venv with $(SYSTEM_PYTHON)"; \
	$(SYSTEM_PYTHON) -m venv --clear "$$venv"; \
	touch "$$venv/.sevpn-venv"; \
	"$$venv/bin/pip" install -q --disable-pip-version-check --no-warn-script-location -c constraints.txt .; \
	"$$venv/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'; \
	mkdir -p "$(DESTDIR)$(BINDIR)"; \
	for cmd in $(SYSTEM_COMMANDS); do \
	  link="$(DESTDIR)$(BINDIR)/$$cmd"; \
	  if { [ -e "$$link" ] || [ -L "$$link" ]; } && [ "$$(readlink "$$link")" != "$(PREFIX)/bin/$$cmd" ]; then \
	    echo "left $$link alone (not ours); $(PREFIX)/bin/$$cmd is sevpn's"; continue; fi; \
	  ln -sfn "$(PREFIX)/bin/$$cmd" "$$link"; \
	done; \
	echo "linked $(SYSTEM_COMMANDS) into $(DESTDIR)$(BINDIR)"; \
	if [ -n "$(DESTDIR)" ]; then echo "DESTDIR is set: not making the system user sevpn"; \
	else \
	  getent group sevpn >/dev/null || groupadd --system sevpn; \
	  getent passwd sevpn >/dev/null || { useradd --system --gid sevpn --no-create-home --home-dir /var/lib/sevpn/hub \
	    --shell /usr/sbin/nologin --comment "sevpn virtual HUB" sevpn && echo "made the system user sevpn"; }; \
	fi; \
	mkdir -p "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(DEFAULTDIR)"; \
	for unit in $(SYSTEM_UNITS); do \
	  sed 's|/opt/sevpn/|$(PREFIX)/|g' "etc/systemd/$$unit" > "$(DESTDIR)$(UNITDIR)/$$unit.tmp"; \
	  mv "$(DESTDIR)$(UNITDIR)/$$unit.tmp" "$(DESTDIR)$(UNITDIR)/$$unit"; \
	done; \
	echo "installed $(SYSTEM_UNITS) into $(DESTDIR)$(UNITDIR)"; \
	for file in $(SYSTEM_DEFAULTS); do \
	  dest="$(DESTDIR)$(DEFAULTDIR)/$$file"; \
	  if [ ! -e "$$dest" ]; then cp "etc/default/$$file" "$$dest"; echo "installed $$dest"; \
	  elif cmp -s "etc/default/$$file" "$$dest"; then rm -f "$$dest.dist"; \
	  else cp "etc/default/$$file" "$$dest.dist"; echo "kept your $$dest; the shipped one is $$dest.dist"; fi; \
	done; \
	if [ -n "$$systemd" ]; then \
	  systemctl daemon-reload; \
	  systemctl try-restart sevpn-hub.service 'sevpn-nic@*.service'; \
	  echo "systemd reloaded; sevpn units that were running restarted"; fi; \
	echo "next: edit $(DEFAULTDIR)/sevpn-hub, then systemctl enable --now sevpn-hub (docs/deploy.md)"

uninstall-system:
	@set -e; $(SYSTEM_CHECKS); \
	if [ -n "$$systemd" ]; then \
	  systemctl stop sevpn-hub.service 'sevpn-nic@*.service' || true; fi; \
	if [ -d "$(DESTDIR)$(UNITDIR)" ]; then \
	  find "$(DESTDIR)$(UNITDIR)" -path '*.wants/*' -type l \
	    \( -name sevpn-hub.service -o -name 'sevpn-nic@*.service' \) -print -delete; fi; \
	for unit in $(SYSTEM_UNITS); do rm -fv "$(DESTDIR)$(UNITDIR)/$$unit"; done; \
	if [ -n "$$systemd" ]; then systemctl daemon-reload; fi; \
	for cmd in $(SYSTEM_COMMANDS); do \
	  link="$(DESTDIR)$(BINDIR)/$$cmd"; \
	  if [ "$$(readlink "$$link")" = "$(PREFIX)/bin/$$cmd" ]; then rm -fv "$$link"; fi; \
	done; \
	for file in $(SYSTEM_DEFAULTS); do \
	  dest="$(DESTDIR)$(DEFAULTDIR)/$$file"; \
	  rm -fv "$$dest.dist"; \
	  if cmp -s "etc/default/$$file" "$$dest"; then rm -fv "$$dest"; \
	  elif [ -e "$$dest" ]; then echo "kept $$dest (edited)"; fi; \
	done; \
	venv="$(DESTDIR)$(PREFIX)"; \
	if [ -e "$$venv/.sevpn-venv" ]; then rm -rf "$$venv"; echo "removed $$venv"; \
	elif [ -e "$$venv" ]; then echo "left $$venv alone: not a sevpn installation"; fi; \
	echo "kept the state in $(DESTDIR)/var/lib/sevpn and the user sevpn (userdel sevpn removes it)"
