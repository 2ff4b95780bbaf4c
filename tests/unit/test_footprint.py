"""What a running gateway imports: heavy libraries that only some policies use are loaded only
when the policy uses them (dnspython ~6 MB, sqlite3 ~1.3 MB per process; the peak-RSS target in
bench/ counts every MB). Checked in a fresh interpreter that builds the gateway's Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import base_policy
from tests.support.toml import dumps

PROBE = """
import json, sys
from pathlib import Path
from gateway.app import Runtime
Runtime(Path(sys.argv[1]))
print(json.dumps(sorted(m for m in sys.modules if "." not in m)))
"""


def loaded_after_start(tmp_path: Path, **sections: Any) -> set[str]:
    policy = base_policy("smtp://127.0.0.1:2525", spool={"directory": str(tmp_path / "spool")},
                         **sections)
    path = tmp_path / "policy.toml"
    path.write_text(dumps(policy))
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", ["dns", "sqlite3", "secrets"])
def test_a_relay_without_dns_filters_loads_no_dnspython_and_no_sqlite(tmp_path: Path,
                                                                       module: str) -> None:
    assert module not in loaded_after_start(tmp_path)


def test_a_policy_with_a_dns_filter_loads_dnspython(tmp_path: Path) -> None:
    """The control: the probe does see dnspython when a filter needs it."""
    filters = [{"name": "rcpt", "recipients": ["@example.test"]}, {"name": "spf"}]
    assert "dns" in loaded_after_start(tmp_path, filters=filters)


SESSIONS_PROBE = """
import asyncio, gc, json, os, smtplib, sys, weakref
from pathlib import Path
import gateway.smtp.server as server
from gateway.app import Runtime

made = []
init = server.SmtpServer.__init__
def tracked(self, *a, **kw):
    init(self, *a, **kw)
    made.append(weakref.ref(self))
server.SmtpServer.__init__ = tracked

def send(port, n):
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@sender.test", ["rcpt@example.test"], f"Subject: {i}\\r\\n\\r\\nhi\\r\\n")

async def main():
    rt = Runtime(Path(sys.argv[1]))
    run = asyncio.create_task(rt.run_forever())
    while not rt.servers or not rt.servers[0].sockets:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # past the start-up gc.collect() + gc.freeze()
    gc.disable()
    await asyncio.to_thread(send, rt.servers[0].sockets[0].getsockname()[1], 5)
    for _ in range(100):
        if not rt.sessions:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    alive = sum(r() is not None for r in made)
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    kinds = sorted({type(o).__name__ for o in gc.garbage})
    print(json.dumps({"made": len(made), "alive": alive, "garbage": kinds}), flush=True)
    os._exit(0)

asyncio.run(main())
"""


def test_ended_sessions_are_freed_at_once_not_by_the_cyclic_collector(tmp_path: Path) -> None:
    """A session in a reference cycle waits for a full collection with its socket, buffers and
    coroutine frames: under load that was ~400 dead sessions and ~10 MB. Sessions must be freed
    by reference counting when they end (the collector disabled here)."""
    policy = base_policy(f"maildir:{tmp_path / 'Maildir'}",
                         spool={"directory": str(tmp_path / "spool")})
    path = tmp_path / "policy.toml"
    path.write_text(dumps(policy))
    out = subprocess.run([sys.executable, "-c", SESSIONS_PROBE, str(path)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["made"] == 5
    assert result["alive"] == 0, result
    assert not {"SmtpServer", "StreamReader", "StreamWriter", "Task"} & set(result["garbage"])


METADATA_PROBE = """
import json, sys
from pathlib import Path
from gateway.app import Runtime
Runtime(Path(sys.argv[1]))
import dns._features
out = {"stand_in": type(sys.modules["importlib.metadata"]).__name__,
       "loaded": sorted(m for m in ("zipfile", "csv", "tempfile") if m in sys.modules),
       "features": {f: dns._features.have(f) for f in dns._features._requirements}}
from importlib.metadata import version
out["dnspython"] = version("dnspython")
out["after"] = type(sys.modules["importlib.metadata"]).__name__
print(json.dumps(out))
"""

REFERENCE_PROBE = """
import json, importlib.metadata, dns._features
print(json.dumps({"features": {f: dns._features.have(f) for f in dns._features._requirements},
                  "dnspython": importlib.metadata.version("dnspython")}))
"""


def _probe(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parents[2], env=env)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_dns_filters_do_not_load_importlib_metadata_and_dnspython_sees_the_same_extras(
        tmp_path: Path) -> None:
    """dnspython asks importlib.metadata about its optional extras at import (2.1 MB with
    zipfile, csv, tempfile): the gateway answers "off" for the extras whose packages are not
    there, as dnspython would, and importlib.metadata still works when asked."""
    filters = [{"name": "rcpt", "recipients": ["@example.test"]}, {"name": "spf"},
               {"name": "dkim"}, {"name": "dmarc"}]
    policy = base_policy("smtp://127.0.0.1:2525", spool={"directory": str(tmp_path / "spool")},
                         filters=filters)
    path = tmp_path / "policy.toml"
    path.write_text(dumps(policy))
    got = _probe(METADATA_PROBE, str(path))
    want = _probe(REFERENCE_PROBE)
    assert got["stand_in"] == "Deferred"
    assert got["loaded"] == []
    assert got["features"] == want["features"]
    assert got["dnspython"] == want["dnspython"]  # the stand-in loads the real module
    assert got["after"] == "module"


PRESENT_EXTRA_PROBE = """
import json, sys
from gateway.dnsextras import defer_package_metadata
first = defer_package_metadata()
untouched = "dns" not in sys.modules
import dns._features
forced = dict(dns._features._cache)
before = type(sys.modules["importlib.metadata"]).__name__
have = dns._features.have("idna")
print(json.dumps({"first": first, "untouched": untouched, "again": defer_package_metadata(), "forced": forced,
                  "before": before, "have": have,
                  "after": type(sys.modules["importlib.metadata"]).__name__}))
"""


def test_an_extra_whose_package_is_present_is_left_to_dnspythons_version_check(
        tmp_path: Path) -> None:
    """An importable "idna" (here without an installed distribution, so its version is
    unknown) is not forced off: dnspython asks importlib.metadata, which loads then."""
    (tmp_path / "idna").mkdir()
    (tmp_path / "idna" / "__init__.py").write_text("")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path.cwd())])}
    got = _probe(PRESENT_EXTRA_PROBE, env=env)
    assert got["first"] is True and got["again"] is False and got["untouched"] is True
    assert "idna" not in got["forced"] and got["forced"].get("dnssec") is False
    assert got["before"] == "Deferred"
    assert got["have"] is False  # no installed distribution: dnspython's own answer
    assert got["after"] == "module"


NACL_PROBE = """
import json, sys
from pathlib import Path
from gateway.app import Runtime
Runtime(Path(sys.argv[1]))
import dkim
data = Path(sys.argv[2])
keys = {b"test._domainkey.football.example.com.": (data / "test.txt").read_bytes().strip(),
        b"sed._domainkey.test.ex.": (data / "eximtest.dns").read_bytes().strip()}
def dnsfunc(name, timeout=5):
    return keys.get(name if name.endswith(b".") else name + b".")
def state():
    return {"stand_in": type(sys.modules.get("nacl.signing")).__name__,
            "sodium": "nacl._sodium" in sys.modules}
out = {"start": state()}
out["rsa"] = dkim.verify((data / "rfc6376.signed.rsa.msg").read_bytes(), dnsfunc=dnsfunc)
out["after_rsa"] = state()
out["ed25519"] = dkim.verify((data / "ed25519test2.msg").read_bytes(), dnsfunc=dnsfunc)
out["after_ed25519"] = state()
print(json.dumps(out))
"""

DKIM_DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"


@pytest.mark.skipif(not DKIM_DATA.is_dir(), reason=f"DKIM corpus not found at {DKIM_DATA}")
def test_dkim_loads_pynacl_at_the_first_ed25519_key_not_at_start(tmp_path: Path) -> None:
    """dkimpy imports PyNaCl (1.2 MB with libsodium) for ed25519 keys alone: the gateway puts
    it off until one is used. RSA signatures verify without it; an ed25519 one loads it and
    verifies."""
    filters = [{"name": "rcpt", "recipients": ["@example.test"]}, {"name": "dkim"}]
    policy = base_policy("smtp://127.0.0.1:2525", spool={"directory": str(tmp_path / "spool")},
                         filters=filters)
    path = tmp_path / "policy.toml"
    path.write_text(dumps(policy))
    got = _probe(NACL_PROBE, str(path), str(DKIM_DATA))
    assert got["start"] == {"stand_in": "Deferred", "sodium": False}
    assert got["rsa"] is True and got["after_rsa"] == got["start"]
    assert got["ed25519"] is True
    assert got["after_ed25519"] == {"stand_in": "module", "sodium": True}
