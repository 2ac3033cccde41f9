# sevpn: a layer-2 VPN on Twisted.  Run as root on Debian.
#   make demo   set everything up and show a hub with two cards at work
#   make test   the whole trial suite (unit and namespace system tests)
#   make bench  throughput and latency through the VPN beside bare veth

VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := $(shell find sevpn twisted -name '*.py') setup.cfg pyproject.toml

.PHONY: all demo test bench system-deps install clean

all: install

# OS tools the demo, the tests and the benchmark drive.
system-deps:
	@missing=""; \
	for tool in ip:iproute2 ss:iproute2 ping:iputils-ping iperf3:iperf3; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
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

test: system-deps install
	$(PY) -m twisted.trial tests

bench: system-deps install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .hypothesis
