"""Settings of the signing filters (dkim_sign, arc sealing) and the engine's signing step when a
signer fails: errors name the key; a failing signer tempfails (451) unless on_error continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from filters.arc import ArcFilter
from filters.dkim_sign import DkimSignFilter
from gateway.filterapi import ConfigError, signs
from gateway.services import Services

DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")
RSA = str(DATA / "test.private")
ED = str(DATA / "ed25519test.key")


def dkim_sign(domains: Any, **kw: Any) -> DkimSignFilter:
    return DkimSignFilter.from_config({"domains": domains, **kw}, Services())


@pytest.mark.parametrize("domains,key,reason", [
    (None, "domains", "must be a table"),
    ({}, "domains", "must be a table"),
    ({"example.test": {"key_file": RSA}}, "domains.example.test.selector", "required"),
    ({"example.test": {"selector": "s"}}, "domains.example.test.key_file", "required"),
    ({"example.test": {"selector": "s", "key_file": "/nonexistent.pem"}},
     "domains.example.test.key_file", "cannot read /nonexistent.pem"),
    ({"example.test": {"selector": "s", "key_file": str(DATA / "test.txt")}},
     "domains.example.test.key_file", "neither a PEM RSA key"),
    ({"example.test": {"selector": "s", "key_file": RSA, "algorithm": "ed25519-sha256"}},
     "domains.example.test.key_file", "Ed25519"),
    ({"example.test": {"selector": "s", "key_file": ED, "algorithm": "rsa-sha256"}},
     "domains.example.test.key_file", "neither"),
    ({"example.test": {"selector": "s", "key_file": RSA, "algorithm": "rsa-sha1"}},
     "domains.example.test.algorithm", "must be one of"),
    ({"example.test": {"selector": "s", "key_file": RSA, "headers": ["to", "subject"]}},
     "domains.example.test.headers", "must include from"),
    ({"example.test": {"selector": "s", "key_file": RSA,
                       "headers": ["from", "received"]}},
     "domains.example.test.headers", "cannot sign received"),
    ({"example.test": {"selector": "s", "key_file": RSA, "oversign": ["x-custom"]}},
     "domains.example.test.oversign", "also be in headers"),
    ({"example.test": {"selector": "s", "key_file": RSA, "bogus": 1}},
     "domains.example.test.bogus", "unknown setting"),
    ({"not a domain": {"selector": "s", "key_file": RSA}}, "domains.not a domain",
     "not a domain name"),
])
def test_dkim_sign_settings_errors(domains: Any, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        dkim_sign(domains)
    assert e.value.key == key and reason in e.value.reason, (e.value.key, e.value.reason)


def test_dkim_sign_key_choice() -> None:
    f = dkim_sign({"Example.TEST.": {"selector": "s", "key_file": RSA},
                   "ed.test": {"selector": "e", "key_file": ED}})
    assert f.key_for("example.test").algorithm == "rsa-sha256"  # type: ignore[union-attr]
    assert f.key_for("a.b.example.test").domain == "example.test"  # type: ignore[union-attr]
    assert f.key_for("ed.test").algorithm == "ed25519-sha256"  # type: ignore[union-attr]
    assert f.key_for("example.test.evil") is None and f.key_for("test") is None
    assert f.key_for("badexample.test") is None
    assert f.only_trusted_clients is True and signs(f)


@pytest.mark.parametrize("cfg,key,reason", [
    ({"seal_domain": "gw.test"}, "seal_selector", "required"),
    ({"seal_domain": "gw.test", "seal_selector": "s"}, "seal_key_file", "required"),
    ({"seal_domain": "gw", "seal_selector": "s", "seal_key_file": RSA}, "seal_domain",
     "not a domain"),
    ({"seal_domain": "gw.test", "seal_selector": "s", "seal_key_file": ED},
     "seal_key_file", "not a PEM RSA private key"),
    ({"seal_domain": "gw.test", "seal_selector": "s", "seal_key_file": RSA,
      "seal_headers": ["subject"]}, "seal_headers", "must include From"),
    ({"seal_domain": "gw.test", "seal_selector": "s", "seal_key_file": RSA,
      "seal_headers": ["from", "authentication-results"]}, "seal_headers", "cannot sign"),
    ({"seal_headers": ["from"]}, "seal_headers", "only with"),
    ({"max_instances": 0}, "max_instances", ">= 1"),
])
def test_arc_settings_errors(cfg: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        ArcFilter.from_config(cfg, Services())
    assert e.value.key == key and reason in e.value.reason, (e.value.key, e.value.reason)


def test_arc_signs_only_when_sealing_is_configured() -> None:
    assert not signs(ArcFilter.from_config({}, Services()))
    sealing = ArcFilter.from_config({"seal_domain": "gw.test", "seal_selector": "s",
                                     "seal_key_file": RSA}, Services(hostname="h.test"))
    assert signs(sealing) and sealing.authserv_id == "h.test"


def test_arc_never_seals_without_our_authres_run(tmp_path: Path) -> None:
    """A forged Authentication-Results with our authserv-id would be copied into the seal if
    the authres filter (which removes such headers) did not run: then nothing is sealed."""
    import asyncio

    from gateway.filterapi import Client, FilterContext, Result, Stage
    from gateway.message import Message

    raw = (b"Authentication-Results: h.test; dmarc=pass header.from=bank.test\r\n"
           b"From: a@bank.test\r\nSubject: x\r\n\r\nbody\r\n")
    path = tmp_path / "m"
    path.write_bytes(raw)
    msg = Message.from_spool(path, len(raw))
    f = ArcFilter.from_config({"seal_domain": "gw.test", "seal_selector": "s",
                               "seal_key_file": RSA}, Services(hostname="h.test"))
    arc_result = Result(data={"result": "none", "sets": []})

    def sign(results: dict) -> tuple:
        ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 1),
                            message=msg, results=results)
        return asyncio.run(f.on_sign(ctx, msg.header_bytes.rstrip(b"\r\n") + b"\r\n"))

    assert sign({"arc": arc_result}) == ()  # authres not in the chain (or skipped)
    assert sign({"arc": arc_result,
                 "authres": Result(data={"authserv_id": "other.test"})}) == ()
    sealed = sign({"arc": arc_result, "authres": Result(data={"authserv_id": "H.test"})})
    assert [h.name for h in sealed] == ["ARC-Seal", "ARC-Message-Signature",
                                        "ARC-Authentication-Results"]
