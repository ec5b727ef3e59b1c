# Install tcpstates where a distribution would put it.
#   make install [DESTDIR=/some/root] [PREFIX=/usr]
#   make test            (same as: bash setup.sh test)
PREFIX ?= /usr
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog

.PHONY: install uninstall test

install:
	install -D -m 0755 tcpstates.py $(DESTDIR)$(SBINDIR)/tcpstates
	install -D -m 0644 tcpstates.8 $(DESTDIR)$(MANDIR)/man8/tcpstates.8
	install -D -m 0644 systemd/tcpstates.service $(DESTDIR)$(UNITDIR)/tcpstates.service
	install -D -m 0644 systemd/tcpstates-metrics.service $(DESTDIR)$(UNITDIR)/tcpstates-metrics.service
	install -D -m 0644 systemd/tcpstates.catalog $(DESTDIR)$(CATALOGDIR)/tcpstates.catalog
	if [ -z "$(DESTDIR)" ]; then journalctl --update-catalog; \
	else journalctl --root="$(DESTDIR)" --update-catalog; fi

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/tcpstates $(DESTDIR)$(MANDIR)/man8/tcpstates.8 \
	      $(DESTDIR)$(UNITDIR)/tcpstates.service $(DESTDIR)$(UNITDIR)/tcpstates-metrics.service \
	      $(DESTDIR)$(CATALOGDIR)/tcpstates.catalog

test:
	bash setup.sh test
