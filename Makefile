# mirrord: install on a systemd distribution (Debian, Ubuntu).
#
#   apt install python3-yaml python3-nftables python3-systemd nftables python3-pip
#   make install                # to /usr/local, config in /etc/mirrord.yaml
#   systemctl enable --now mirrord
#
#   make install PREFIX=/usr DESTDIR=/tmp/pkgroot   # for packaging
#   make uninstall              # keeps /etc/mirrord.yaml
#
# The Python package goes to $(LIBDIR) through `pip install --target` and
# not into the system site-packages: Debian marks those "externally
# managed" (PEP 668), and a private directory keeps apt's modules untouched.
# Dependencies come from apt (--no-deps), so pip needs no network.
# $(BINDIR)/mirrord is a small launcher that puts $(LIBDIR) on sys.path.
# Nothing below writes the DESTDIR into installed files.
# (`pip install .` into a virtualenv also gives the `mirrord` command.)

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/mirrord
DATADIR ?= $(PREFIX)/share/mirrord
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSCONFDIR ?= /etc
PYTHON ?= /usr/bin/python3
# The interpreter the launcher runs; the one whose apt modules are used.
PYTHON_SHEBANG ?= $(PYTHON)
# Firewall services whose (re)start must be followed by a mirrord reload.
FIREWALL_UNITS ?= nftables.service netfilter-persistent.service firewalld.service

INSTALL ?= install
SED ?= sed

SPEC_EXAMPLE := etc/mirrord.yaml
UNIT := packaging/systemd/mirrord.service
DROPIN := packaging/systemd/firewall-reassert.conf
TMPFILES := packaging/systemd/mirrord.tmpfiles

.PHONY: all help install install-python install-systemd install-config uninstall

all: help

help:
	@echo "make install    [PREFIX=$(PREFIX)] [DESTDIR=] [SYSCONFDIR=$(SYSCONFDIR)]"
	@echo "make uninstall  (keeps $(SYSCONFDIR)/mirrord.yaml)"

install: install-python install-systemd install-config
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		systemd-tmpfiles --create $(TMPFILESDIR)/mirrord.conf || true; \
	fi
	@$(PYTHON) -c 'import yaml' 2>/dev/null || echo \
		"note: mirrord needs: apt install python3-yaml (and python3-nftables, python3-systemd)"
	@echo "installed; start with: systemctl enable --now mirrord"

install-python:
	@$(PYTHON) -c 'import setuptools, wheel, pip' 2>/dev/null || { echo >&2 \
		"make install builds with $(PYTHON) -m pip: apt install python3-pip python3-setuptools python3-wheel"; \
		exit 1; }
	rm -rf "$(DESTDIR)$(LIBDIR)"
	$(INSTALL) -d "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(BINDIR)"
	# Built from a copy: an in-tree build leaves build/ and *.egg-info behind.
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp -R pyproject.toml README.md mirrord "$$tmp/" && \
	find "$$tmp" -name __pycache__ -prune -exec rm -rf {} + && \
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation --no-compile \
		--disable-pip-version-check --target "$(DESTDIR)$(LIBDIR)" "$$tmp"
	# pip's console script would hard-code the interpreter pip ran under and
	# knows nothing of $(LIBDIR); the launcher below replaces it.
	rm -rf "$(DESTDIR)$(LIBDIR)/bin"
	printf '%s\n' '#!$(PYTHON_SHEBANG)' 'import sys' \
		'sys.path.insert(0, "$(LIBDIR)")' \
		'from mirrord.cli import main' 'sys.exit(main())' > "$(DESTDIR)$(BINDIR)/mirrord.tmp"
	chmod 0755 "$(DESTDIR)$(BINDIR)/mirrord.tmp"
	mv -f "$(DESTDIR)$(BINDIR)/mirrord.tmp" "$(DESTDIR)$(BINDIR)/mirrord"

install-systemd:
	$(INSTALL) -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(TMPFILESDIR)"
	$(SED) 's|/usr/bin/mirrord|$(BINDIR)/mirrord|g' $(UNIT) > "$(DESTDIR)$(UNITDIR)/mirrord.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/mirrord.service"
	for u in $(FIREWALL_UNITS); do \
		$(INSTALL) -d "$(DESTDIR)$(UNITDIR)/$$u.d" && \
		$(INSTALL) -m 0644 $(DROPIN) "$(DESTDIR)$(UNITDIR)/$$u.d/50-mirrord.conf" || exit 1; \
	done
	$(INSTALL) -m 0644 $(TMPFILES) "$(DESTDIR)$(TMPFILESDIR)/mirrord.conf"

install-config:
	@test -f $(SPEC_EXAMPLE) || { echo "missing $(SPEC_EXAMPLE)" >&2; exit 1; }
	$(INSTALL) -d "$(DESTDIR)$(DATADIR)" "$(DESTDIR)$(SYSCONFDIR)"
	$(INSTALL) -m 0644 $(SPEC_EXAMPLE) "$(DESTDIR)$(DATADIR)/mirrord.yaml.example"
	@# An existing spec is the admin's: never overwritten.
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/mirrord.yaml" ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/mirrord.yaml"; \
	else \
		echo "$(INSTALL) -m 0644 $(SPEC_EXAMPLE) $(DESTDIR)$(SYSCONFDIR)/mirrord.yaml"; \
		$(INSTALL) -m 0644 $(SPEC_EXAMPLE) "$(DESTDIR)$(SYSCONFDIR)/mirrord.yaml"; \
	fi

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now mirrord.service 2>/dev/null || true; \
	fi
	rm -f "$(DESTDIR)$(BINDIR)/mirrord"
	rm -rf "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(DATADIR)"
	rm -f "$(DESTDIR)$(UNITDIR)/mirrord.service" "$(DESTDIR)$(TMPFILESDIR)/mirrord.conf"
	for u in $(FIREWALL_UNITS); do \
		rm -f "$(DESTDIR)$(UNITDIR)/$$u.d/50-mirrord.conf"; \
		rmdir "$(DESTDIR)$(UNITDIR)/$$u.d" 2>/dev/null || true; \
	done
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "kept $(SYSCONFDIR)/mirrord.yaml"
