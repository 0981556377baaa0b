"""TLS-PSK on the link: `prepl keygen`, a secondary served with --tls-psk,
the agent with the same key over nbds:// works; plaintext and a wrong key
are refused with a clear message (exit 5), the replica untouched; and off
loopback nothing is served without TLS."""
import json
import os
import stat

from tests.conftest import prepl

MiB = 1 << 20


def test_tls_psk_link(tmp_path, make_server):
    key, other = tmp_path / "link.psk", tmp_path / "other.psk"
    prepl("keygen", key)
    prepl("keygen", other)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert prepl("keygen", key, check=False).returncode == 5      # never overwrites a key
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", "8M")
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", "8M",
          "--role", "secondary")
    prim = make_server(tmp_path / "p").start()
    sec = make_server(tmp_path / "s")
    sec.extra = ["--tls-psk", str(key)]
    sec.start()
    prim.connect().pwrite(b"t" * MiB, 3 * MiB)
    plain = f"nbd+unix:///?socket={sec.sock}"
    tls = f"nbds+unix:///?socket={sec.sock}"

    r = prepl("agent", prim.state, "--secondary", plain, "--once", "--timeout", "10",
              check=False)
    assert r.returncode == 5 and "requires TLS" in r.stderr
    r = prepl("agent", prim.state, "--secondary", tls, "--tls-psk", other, "--once",
              "--timeout", "10", check=False)
    assert r.returncode == 5 and "not the secondary's key" in r.stderr
    assert "gnutls" in sec.output()                  # the server logs the refusal too
    assert json.loads(prepl("status", sec.state, "--json").stdout)["applied"] is None

    prepl("agent", prim.state, "--secondary", tls, "--tls-psk", key, "--once")
    status = json.loads(prepl("status", sec.state, "--json").stdout)
    assert status["applied"] is not None and status["uri"].startswith("nbds+unix://")


def test_psk_file_checks(tmp_path):
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", "8M")
    loose = tmp_path / "loose.psk"
    loose.write_text("prepl:" + "ab" * 32 + "\n")
    os.chmod(loose, 0o644)
    r = prepl("serve", tmp_path / "s", "--unix", tmp_path / "x.sock", "--tls-psk", loose,
              check=False)
    assert r.returncode == 2 and "readable by others" in r.stderr
    bad = tmp_path / "bad.psk"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    r = prepl("serve", tmp_path / "s", "--unix", tmp_path / "x.sock", "--tls-psk", bad,
              check=False)
    assert r.returncode == 2 and "is not a PSK file" in r.stderr
