"""The wheel, as `pip wheel .` makes it: it carries the compiled relay engine, and a gateway
and a node run from it alone (not from this checkout) move a file end to end."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.procs import Proc, free_port, make_key, sftp_batch

REPO = Path(__file__).resolve().parent.parent
# What a source tree holds besides the sources: environments, caches, earlier builds.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                      "__pycache__", ".pytest_cache", ".hypothesis", "*.so")


def _run(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                         **kw)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def test_the_wheel_carries_the_engine_and_serves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)   # the build writes into its tree
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", src)
    [wheel] = (tmp_path / "dist").iterdir()
    assert re.fullmatch(r"edgegw-[\d.]+-cp3\d+-cp3\d+-linux_\w+\.whl", wheel.name), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"edgegw/_relay\.cpython-.*\.so", n) for n in names), names
    assert any(re.fullmatch(r"internal/ssh/_aead\.cpython-.*\.so", n) for n in names), names
    assert "edgegw/py.typed" in names and "internal/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "csrc/")) or
                n.endswith(".c")], names

    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
         site, wheel)
    run_dir = tmp_path / "run"   # not this checkout: nothing may be imported from it
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    edgegw = [sys.executable, str(site / "bin" / "edgegw")]
    where = _run(sys.executable, "-c", "import edgegw, edgegw._relay, internal; "
                 "from edgegw.relay import default_backend; "
                 "print(edgegw.__file__, edgegw._relay.__file__, internal.__file__, "
                 "default_backend())", env=env, cwd=run_dir).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where[:3]), where
    assert where[3] == "splice"

    home = tmp_path / "home"
    _run(*edgegw, "internal", "init", "--home", home, env=env, cwd=run_dir)
    key = make_key(tmp_path / "key")
    _run(*edgegw, "internal", "user", "add", "partner", "--home", home, "--key", f"{key}.pub",
         env=env, cwd=run_dir)
    ext, pnc, data = free_port(), free_port(), free_port()
    gateway = Proc("gateway", [*edgegw, "serve", "--external", f"127.0.0.1:{ext}",
                               "--pnc", f"127.0.0.1:{pnc}", "--data", f"127.0.0.1:{data}",
                               "--trust", str(home / "gateway-trust.pem")],
                   tmp_path / "gateway.log", env=env, cwd=str(run_dir)).start()
    node = None
    try:
        assert gateway.wait_log(r"listening: .* relay=(\w+)").group(1) == "splice"
        node = Proc("node", [*edgegw, "internal", "serve", "--home", str(home), "--workers", "1",
                             "--gateway", f"127.0.0.1:{pnc}"],
                    tmp_path / "node.log", env=env, cwd=str(run_dir)).start()
        node.wait_log(r"attached to gateway ")
        payload = os.urandom(3 << 20)
        (tmp_path / "in.bin").write_bytes(payload)
        res = sftp_batch(ext, "partner", key, "put in.bin\nget in.bin out.bin\n", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "out.bin").read_bytes() == payload
        assert (home / "files" / "partner" / "in.bin").read_bytes() == payload
    finally:
        if node is not None:
            node.stop()
        gateway.stop()
