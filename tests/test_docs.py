"""The documentation cannot drift from the code: options, fields, the USAGE
block of the examples file, and the commands README promises."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import tcpstates
from helpers import ROOT, TOOL, FakeProcs, formatter, json_record, make_event, v6_event

MAN = os.path.join(ROOT, "tcpstates.8")
EXAMPLES = os.path.join(ROOT, "tcpstates_example.txt")
README = os.path.join(ROOT, "README.md")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def public_options():
    """Every option string the parser shows in --help."""
    parser = tcpstates.build_parser()
    opts = set()
    for action in parser._actions:
        if action.help == "==SUPPRESS==":
            continue
        opts.update(action.option_strings)
    return opts


def man_section(name):
    text = read(MAN)
    m = re.search(r"^\.SH %s\n(.*?)(?=^\.SH )" % re.escape(name), text, re.S | re.M)
    assert m, "man page has no %s section" % name
    return m.group(1)


def test_man_options_match_the_parser():
    section = man_section("OPTIONS").replace("\\-", "-")
    documented = set(re.findall(r"^(-[-\w]+)(?: [A-Z]+)?(?:,\s*(--[\w-]+))?", section, re.M))
    flat = {o for pair in documented for o in pair if o}
    assert flat == public_options()


def usage_text():
    """The usage lines of --help, joined into one."""
    out = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True,
                         text=True).stdout
    return " ".join(out.split("\n\n", 1)[0].split()).replace("usage: ", "")


def test_man_synopsis_matches_usage():
    synopsis = man_section("SYNOPSIS").replace("\\-", "-").splitlines()
    assert "tcpstates " + " ".join(synopsis[1:]).strip() == usage_text()


@pytest.mark.parametrize("argv", [[], ["-w"], ["-T", "-t"], ["-s"], ["-x"]])
def test_man_fields_cover_every_column(argv):
    fields = man_section("FIELDS").replace("\\-", "-")
    documented = re.findall(r"^\.TP\n(\S+)", fields, re.M)
    header = [f for f in formatter(*argv).header_fields()
              if f != "->"]
    for column in header:
        assert column in documented, column


def test_man_sections_in_bcc_order():
    sections = re.findall(r"^\.SH (.+)$", read(MAN), re.M)
    assert sections == ["NAME", "SYNOPSIS", "DESCRIPTION", "REQUIREMENTS", "OPTIONS",
                        "EXAMPLES", "FIELDS", "REASONS", "JOURNAL FIELDS", "METRICS",
                        "LOSS ACCOUNTING",
                        "OVERHEAD",
                        "FILES", "SOURCE", "OS", "STABILITY",
                        "AUTHOR", "SEE ALSO"]


def test_man_escapes_every_minus():
    for n, line in enumerate(read(MAN).splitlines(), 1):
        body = line[3:] if line.startswith((".TH", ".SH", ".TP", ".PP", ".B ")) else line
        body = body.replace("\\(->", "")      # groff's arrow glyph
        assert not re.search(r"(?<!\\)-", body), "line %d: unescaped '-': %s" % (n, line)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_page_is_clean_under_groff():
    proc = subprocess.run(["groff", "-man", "-ww", "-z", MAN], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_examples_file_ends_with_the_real_help():
    help_text = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True,
                               text=True).stdout
    text = read(EXAMPLES)
    assert text.endswith("# ./tcpstates.py -h\n" + help_text)


def test_examples_show_every_public_option():
    # before the USAGE block, which lists them all anyway
    text = read(EXAMPLES).split("USAGE message:")[0]
    runs = " ".join(re.findall(r"^# \./tcpstates\.py(.*)$", text, re.M))
    shown = set(re.findall(r"(?<![\w-])(-[A-Za-z0-9]|--[a-z][\w-]+)", runs))
    options = {o for o in public_options() if o not in ("-h", "--help")}
    # an option counts when a captured run uses it, or the prose names it
    # (-D, -4, -6, --count: explained after a run of their neighbours)
    for opt in options - shown:
        pair = [a.option_strings for a in tcpstates.build_parser()._actions
                if opt in a.option_strings][0]
        if set(pair) & shown:
            continue
        assert any(re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(o), text) for o in pair), opt


def test_readme_commands_and_ci_agree():
    readme = read(README)
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    commands = [b.split("#")[0].strip() for b in blocks[:2]]
    assert commands[0] == "bash setup.sh run"
    assert commands[1] == "bash setup.sh test"
    ci = read(os.path.join(ROOT, ".ci", "run"))
    ci_commands = [l.strip() for l in ci.splitlines()
                   if l.strip() and not l.lstrip().startswith(("#", "set ", "cd ", "export "))]
    assert ci_commands == [commands[1]]
    assert "TCPSTATES_REQUIRE_LIVE=1" in ci


def test_readme_usage_matches_help():
    assert usage_text() in read(README)
    for opt in public_options() - {"-h", "--help"}:
        assert "`%s" % opt in read(README), opt


def test_man_documents_every_json_key():
    text = read(MAN)
    start = text.index(".SS JSON KEYS")
    section = text[start:text.index("\n.SH ", start)]
    documented = set()
    for entry in re.findall(r"^\.TP\n(.+)$", section, re.M):
        documented.update(k.strip() for k in entry.split(","))
    # (kind and age_at_least: only on --stuck rows, see tests/test_stuck.py)
    assert documented - {"kind", "age_at_least"} == set(json_record(formatter("-j"), make_event()))


def test_man_documents_every_journal_field():
    section = man_section("JOURNAL FIELDS")
    documented = set()
    for entry in re.findall(r"^\.TP\n(.+)$", section, re.M):
        documented.update(k.strip() for k in entry.split(","))
    clock, procs = tcpstates.Clock(), FakeProcs()
    sent = set(tcpstates.journal_fields(make_event(), clock, procs.owner(make_event()))) | set(
        tcpstates.journal_fields(v6_event(), clock, procs.owner(v6_event())))
    # a move to CLOSE with every fact about its end
    ev = make_event(oldstate=1, newstate=7, rflags=31, rst_reason=14, error=103, retries=1)
    sent |= set(tcpstates.journal_fields(ev, clock, procs.owner(ev), formatter().reasons(ev)))
    assert {"TCPSTATES_REASON", "ERRNO", "TCPSTATES_RETRIES", "TCPSTATES_RESET_REASON"} <= sent
    assert sent <= documented
    assert set(tcpstates.lost_fields(1, 2)) - sent <= set(re.findall(r"TCPSTATES_\w+", section))


def test_man_metrics_lists_every_metric_its_labels_and_values():
    pytest.importorskip("prometheus_client", reason="python3-prometheus-client")
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import CollectorRegistry, generate_latest
    section = man_section("METRICS").replace("\\-", "-")
    documented = {}
    for entry in re.findall(r"^\.TP\n(.+)$", section, re.M):
        name, _, labels = entry.partition("{")
        documented[name.strip()] = {l.strip() for l in labels.rstrip("}").split(",") if l}
    metrics = tcpstates.Metrics()
    metrics.add([make_event(oldstate=2, newstate=1)])
    metrics.set_stuck({8: 0})           # as with --stuck
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    exported = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        exported[name] = labels
    assert documented == exported
    for cause in tcpstates.LOSS_CAUSES + tcpstates.CONNECT_RESULTS:
        assert '"%s"' % cause in section, cause
    buckets = ", ".join("%g" % (b / 1e6) for b in tcpstates.DURATION_BOUNDS_US)
    assert buckets.replace(", 600", " and 600") in " ".join(section.split())
    assert "At most %d sets" % tcpstates.METRICS_BY_LIMIT in section
