"""The package installs and imports as one namespace, editable and from a plain wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import livelm, livelm.daemon, livelm.protocol, livelm.native, livelm.client
from livelm.native.ring import Ring
from livelm.daemon.engine.engine import Engine
ring = Ring(16)
assert ring.write([1, 2, 3]) and ring.read(3).tolist() == [1, 2, 3]
print(livelm.daemon.__file__)
print(livelm.native.ring.__file__)
"""


def _probe(cwd: Path, env_path: str | None = None) -> list[str]:
    env = None if env_path is None else {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-I" if env_path is None else "-s", "-c", PROBE],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_installed_package_imports_outside_the_source_tree(tmp_path: Path) -> None:
    daemon_file, ring_file = _probe(tmp_path)
    assert Path(daemon_file).is_relative_to(REPO / "daemon")  # editable install maps the folders
    assert Path(ring_file).is_relative_to(REPO / "native")


def test_plain_wheel_installs_and_imports(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("livelm-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    site_packages = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    daemon_file, ring_file = _probe(tmp_path, env_path=f"{site}:{site_packages}")
    assert Path(daemon_file).is_relative_to(site)
    assert Path(ring_file).is_relative_to(site)
