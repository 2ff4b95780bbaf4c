"""Mis-deployment checks (gateway/policy/lint.py) through ``load_engine``, as ``check-policy``
and ``run`` use them: accepted domains no recipient check covers (warning), ``rcpt`` entries
and ``relay.transport`` routes for domains that are not accepted (error), thresholds that can
never fire (error), DMARC without SPF/DKIM, every problem of a file in one run, and "did you
mean" for unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.app import load_engine
from gateway.errors import PolicyError
from gateway.filterapi import Filter, FilterContext, Result
from gateway.services import Services
from tests.support import toml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*REPO.glob("policies/*.toml"), *REPO.glob("policies/*.yaml")])


def check(tmp_path: Path, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the policy ``data`` written to a file, as load_engine finds
    them; the file name is cut off each line."""
    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(data))
    prefix = f"{path}: "
    try:
        engine = load_engine(path)
    except PolicyError as e:
        problems, warnings = list(e.problems), list(getattr(e, "warnings", ()))
    else:
        problems, warnings = [], list(getattr(engine, "warnings", ()))
    assert all(x.startswith(prefix) for x in problems + warnings), problems + warnings
    return ([x.removeprefix(prefix) for x in problems],
            [x.removeprefix(prefix) for x in warnings])


def policy(accepted: list[str], recipients: list[str] | None = None, **kw: Any
           ) -> dict[str, Any]:
    data: dict[str, Any] = {"domains": {"accepted": accepted},
                            "relay": {"mode": "queue", "downstream": "smtp://127.0.0.1:10025"}}
    if recipients is not None:
        data["filters"] = [{"name": "rcpt", "recipients": recipients}]
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


# -- accepted domains that no recipient check covers -------------------------------------------

def test_new_admins_domain_with_the_stale_example_rcpt_list_is_refused_and_warned(tmp_path):
    # The default policy with only domains.accepted changed: rcpt still lists @example.test.
    problems, warnings = check(tmp_path, policy(["mycorp.example"], ["@example.test"]))
    assert problems == [
        "filters.rcpt: example.test is not in domains.accepted: mail to it is refused as relay "
        "(550 5.7.1) before any filter runs, so its entries never apply; add example.test to "
        "domains.accepted, or remove them"]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "domains.accepted: warning: mycorp.example: no recipient filter (rcpt) lists it, so "
        "every address @mycorp.example is accepted, unknown users too (queue mode: the "
        "downstream's refusal becomes a bounce to a possibly forged sender)")


def test_uncovered_domain_is_a_warning_and_covered_ones_are_not(tmp_path):
    problems, warnings = check(tmp_path, policy(
        ["a.example", "b.example", "c.example", "open.example"],
        ["alice@a.example", "@b.example"], filters=[
            {"name": "rcpt", "recipients": ["alice@a.example", "@b.example"],
             "domains": ["c.example"]}]))
    assert problems == []
    assert [w.split(": ")[2] for w in warnings] == ["open.example"]


def test_no_recipient_filter_at_all_warns_for_every_domain(tmp_path):
    problems, warnings = check(tmp_path, policy(["a.example", "b.example"]))
    assert problems == []
    assert [w.split(": ")[2:4] for w in warnings] == [
        ["a.example", "the chain has no recipient filter (rcpt), so every address @a.example "
                      "is accepted, unknown users too (queue mode"],
        ["b.example", "the chain has no recipient filter (rcpt), so every address @b.example "
                      "is accepted, unknown users too (queue mode"]]


def test_proxy_mode_to_smtp_is_covered_by_the_downstream_but_maildir_is_not(tmp_path):
    # In proxy mode each RCPT goes to the downstream in lockstep: its 550 reaches the client.
    assert check(tmp_path, policy(["a.example"], relay={"mode": "proxy"})) == ([], [])
    _, warnings = check(tmp_path, policy(["a.example"], relay={
        "mode": "proxy", "downstream": "maildir:Maildir"}))
    assert len(warnings) == 1 and "@a.example is accepted, unknown users too;" in warnings[0]
    # a domain routed to a Maildir in proxy mode is open, the others are not
    _, warnings = check(tmp_path, policy(["a.example", "b.example"], relay={
        "mode": "proxy", "transport": {"b.example": "maildir:Maildir"}}))
    assert [w.split(": ")[2] for w in warnings] == ["b.example"]


def test_a_class_that_skips_the_recipient_filter_leaves_its_domains_open(tmp_path):
    _, warnings = check(tmp_path, policy(
        ["a.example", "vip.example"], ["@a.example", "boss@vip.example"],
        classes={"vip": {"domains": ["vip.example"], "skip_filters": ["rcpt"]}}))
    assert len(warnings) == 1
    assert warnings[0].startswith("domains.accepted: warning: vip.example: its class skips "
                                  "rcpt, so every address @vip.example is accepted")


class DirectoryFilter(Filter):
    """A custom recipient check (say, an LDAP lookup) that declares what it covers."""

    name = "directory"

    def __init__(self) -> None:
        from gateway.filterapi import RecipientCoverage

        self.recipient_coverage = RecipientCoverage(every_domain=True)

    @classmethod
    def from_config(cls, cfg: Any, services: Services) -> DirectoryFilter:
        return cls()

    async def on_rcpt(self, ctx: FilterContext) -> Result:
        return Result()


def test_a_custom_filter_declaring_its_coverage_counts(tmp_path):
    module = f"{__name__}:DirectoryFilter"
    data = policy(["a.example"], filters=[{"name": "directory", "module": module}])
    assert check(tmp_path, data) == ([], [])
    # the same without the declaration: the domain is open
    data["filters"] = [{"name": "headers"}]
    _, warnings = check(tmp_path, data)
    assert len(warnings) == 1 and "@a.example is accepted, unknown users too" in warnings[0]


def test_coverage_is_not_judged_when_a_filter_could_not_be_built(tmp_path):
    # The broken rcpt entry is the one problem; no warning made up from its absence.
    problems, warnings = check(tmp_path, policy(["a.example"], filters=[
        {"name": "rcpt", "recipients": ["@a.example"], "colour": "red"}]))
    assert problems == ["filters.rcpt.colour: unknown setting (known: domains, "
                        "recipient_map_file, recipients)"]
    assert warnings == []


# -- entries and routes for domains that are not accepted --------------------------------------

def test_rcpt_entries_for_unaccepted_domains_with_trusted_networks_are_a_warning(tmp_path):
    problems, warnings = check(tmp_path, policy(
        ["a.example"], ["@a.example", "bob@partner.example"],
        domains={"trusted_networks": ["10.0.0.0/8"]}))
    assert problems == []
    assert warnings == ["filters.rcpt: warning: partner.example is not in domains.accepted: "
                        "only clients in domains.trusted_networks reach its entries"]


def test_transport_route_for_an_unaccepted_domain_is_refused(tmp_path):
    # The README's old example: accepted example.com, a route for example.net.
    problems, _ = check(tmp_path, policy(["example.com"], ["@example.com"], relay={
        "transport": {"example.net": "smtp://10.0.0.6:25", ".example.org": "mx"}}))
    assert problems == [
        "relay.transport..example.org: no accepted domain is a subdomain of example.org and "
        "domains.trusted_networks is empty: no recipient can ever take this route; add the "
        "domain to domains.accepted, or remove the route",
        "relay.transport.example.net: example.net is not in domains.accepted and "
        "domains.trusted_networks is empty: no recipient can ever take this route; add the "
        "domain to domains.accepted, or remove the route"]


def test_reachable_routes_are_accepted(tmp_path):
    # accepted, a subdomain route that an accepted domain takes, and (with trusted networks)
    # outbound routes for relayed mail
    assert check(tmp_path, policy(["example.com", "eu.example.org"],
                                  ["@example.com", "@eu.example.org"], relay={
        "transport": {"example.com": "smtp://10.0.0.6:25",
                      ".example.org": "smtp://10.0.0.7:25"}})) == ([], [])
    assert check(tmp_path, policy(["example.com"], ["@example.com"],
                                  domains={"trusted_networks": ["10.0.0.0/8"]},
                                  relay={"transport": {".partner.example": "mx"}})) == ([], [])


# -- thresholds that can never fire ------------------------------------------------------------

@pytest.mark.parametrize(("actions", "expected"), [
    ({"quarantine": 8, "reject": 5},
     "actions.quarantine: can never fire: reject starts at 5, at or below 8"),
    ({"add_header": 20, "reject": 15},
     "actions.add_header: can never fire: reject starts at 15, at or below 20"),
    ({"rewrite_subject": 6, "quarantine": 6},
     "actions.rewrite_subject: can never fire: quarantine starts at 6, at or below 6"),
    ({"add_header": 9, "quarantine": 8, "reject": 7},
     "actions.add_header: can never fire: reject starts at 7, at or below 9"),
])
def test_a_threshold_that_can_never_fire_is_refused(tmp_path, actions, expected):
    problems, _ = check(tmp_path, policy(["a.example"], ["@a.example"], actions=actions))
    assert problems[0].startswith(expected), problems
    assert "the most severe action reached wins" in problems[0]


def test_threshold_order_in_a_class_is_checked_and_inherited_values_are_not(tmp_path):
    data = policy(["a.example", "s.example"], ["@a.example", "@s.example"],
                  actions={"add_header": 5.0, "reject": 15.0},
                  classes={"s": {"domains": ["s.example"],
                                 "actions": {"quarantine": 4, "tempfail": 3}}})
    problems, _ = check(tmp_path, data)
    assert problems == [
        "classes.s.actions.quarantine: can never fire: tempfail starts at 3, at or below 4, and "
        "the most severe action reached wins (every score >= 4 gets tempfail); raise tempfail, "
        "lower quarantine, or set it to false"]
    # A class that only lowers reject (below the inherited add_header) is a deliberate
    # override, and a threshold set to false never fires by design: both fine.
    data["classes"]["s"]["actions"] = {"reject": 1.0}
    data["actions"] = {"add_header": 5.0, "quarantine": False, "reject": 15.0}
    assert check(tmp_path, data) == ([], [])


# -- DMARC without SPF or DKIM; everything in one run ------------------------------------------

def test_dmarc_without_spf_or_dkim_is_reported_with_the_other_problems(tmp_path):
    problems, _ = check(tmp_path, policy(["a.example"], filters=[
        {"name": "rcpt", "recipients": ["@a.example"]},
        {"name": "spf", "enabled": False}, {"name": "dmarc"}], limits={"max_recipients": 0}))
    assert problems == [
        "limits.max_recipients: must be an integer >= 1",
        "filters.dmarc: requires filter 'spf', its entry has enabled = false: add it, or "
        "remove 'dmarc'",
        "filters.dmarc: requires filter 'dkim', not in the chain: add it, or remove 'dmarc'"]


def test_every_problem_of_a_file_in_one_run(tmp_path):
    # 3 problems the loader finds, 2 in filter settings, 1 mis-deployment: all six at once
    # (before, only the first three, and the rest one fix at a time).
    problems, _ = check(tmp_path, {
        "server": {"wrokers": 2},
        "domains": {"accepted": ["a.example"]},
        "limits": {"max_recipients": 0, "idle_timeout_s": -1},
        "filters": [{"name": "rcpt", "recipients": ["nobody"]},
                    {"name": "headers", "strict": True}],
        "actions": {"quarantine": 8, "reject": 5},
    })
    assert [p.split(":")[0] for p in problems] == [
        "server.wrokers", "limits.max_recipients", "limits.idle_timeout_s",
        "filters.rcpt.recipients", "filters.headers.strict", "actions.quarantine"]


# -- did you mean ------------------------------------------------------------------------------

def test_unknown_keys_close_to_known_ones_get_a_suggestion(tmp_path):
    problems, _ = check(tmp_path, {
        "servr": {},
        "server": {"wrokers": 2},
        "domains": {"accepted": ["a.example"]},
        "filters": [{"name": "rcpt", "recipient": ["@a.example"], "timout_s": 5},
                    {"name": "headers", "colour": "red"}],
    })
    assert problems == [
        "servr: unknown key (did you mean 'server'?)",
        "server.wrokers: unknown key (did you mean 'workers'?)",
        "filters.rcpt.recipient: unknown setting (did you mean 'recipients'?) (known: domains, "
        "recipient_map_file, recipients)",
        # every unknown setting of a filter, not only its first (tests/integration/
        # test_admin_errors.py); a misspelt entry key gets that key suggested
        "filters.rcpt.timout_s: unknown setting (did you mean 'timeout_s'?) (known: domains, "
        "recipient_map_file, recipients)",
        # nothing close: no suggestion
        "filters.headers.colour: unknown setting (known: )"]
    # a chain entry's own key, misspelt, reads as a filter setting: suggested all the same
    problems, _ = check(tmp_path, {"filters": [{"name": "headers", "timout_s": 5}]})
    assert problems == ["filters.headers.timout_s: unknown setting (did you mean 'timeout_s'?) "
                        "(known: )"]


def test_the_entry_keys_the_settings_suggest_are_the_loaders():
    from gateway.policy.loader import FILTER_KEYS
    from gateway.settings import ENTRY_KEYS

    assert ENTRY_KEYS == FILTER_KEYS


# -- the shipped policies ----------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_policies_have_no_findings(path, monkeypatch):
    monkeypatch.chdir(REPO)  # policies name their files relative to the start directory
    assert load_engine(path.relative_to(REPO)).warnings == ()


def test_a_misspelt_filter_name_gets_a_suggestion(tmp_path):
    problems, _ = check(tmp_path, policy(["a.example"], filters=[
        {"name": "rcpt", "recipients": ["@a.example"]}, {"name": "atachments"},
        {"name": "ghost"}]))
    assert [p.split(":")[:2] for p in problems] == [
        ["filters.atachments", " no such filter (did you mean 'attachments'?)"],
        ["filters.ghost", " no such filter"]]
