"""The project installs so that ``twistd`` finds its daemons.

Each test builds a throw-away venv that borrows the project venv's installed
dependencies (a ``.pth`` file naming its site-packages) and installs a copy of
this working tree into it with ``--no-deps --no-build-isolation --no-index``:
no download, a few seconds each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("imgateway", "improcessor", "imapi")

pytestmark = pytest.mark.slow

# what is not part of a source tree (build products, venvs, caches)
_IGNORE = shutil.ignore_patterns(".git", ".venv*", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis", "dropin.cache", "_trial_temp*", "node_modules")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"$ {' '.join(map(str, argv))}\n{result.stdout}\n{result.stderr}"
    return result


def _venv(path: Path) -> Path:
    """A venv at ``path`` that sees the project venv's packages, without the project itself."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # a .pth line only adds a path: the project venv's own .pth files (its editable
    # install of this tree) are not processed, so the project comes from our install alone
    (site / "_imcluster_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _source_copy(dest: Path) -> Path:
    """This working tree (committed or not), without build products."""
    shutil.copytree(ROOT, dest, ignore=_IGNORE)
    return dest


def _pip_install(python: Path, *args: str) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
          "--no-deps", "--no-build-isolation", "--no-index", *args])


def _twistd_help(python: Path, cwd: Path) -> str:
    # -I: no cwd or PYTHONPATH on sys.path, so only the install can provide the plugins
    code = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    return _run([str(python), "-I", "-c", code, "--help"], cwd=cwd).stdout


def _imported_from(python: Path, cwd: Path) -> Path:
    code = "import imcluster, twisted.plugins.imcluster_plugins as p; print(imcluster.__file__); print(p.__file__)"
    package, plugin = _run([str(python), "-I", "-c", code], cwd=cwd).stdout.split()
    return Path(package), Path(plugin)


def _site_packages(python: Path) -> Path:
    return Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())


def _readme_editable_command() -> str:
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    match = re.search(r"pip install -e \S+ --config-settings editable_mode=compat", text)
    assert match, "README.rst must document the editable install in compat mode"
    return match.group(0)


def test_install_lists_daemons(tmp_path):
    """After `pip install .`, `twistd --help` must list imgateway, improcessor and imapi (else operators cannot start them)."""
    python = _venv(tmp_path / "venv")
    _pip_install(python, str(_source_copy(tmp_path / "src")))
    help_text = _twistd_help(python, tmp_path)
    for daemon in DAEMONS:
        assert re.search(rf"^\s+{daemon}\s", help_text, re.M), help_text

    site = _site_packages(python)
    package, plugin = _imported_from(python, tmp_path)
    assert package.is_relative_to(site) and plugin.is_relative_to(site)
    plugins = site / "twisted" / "plugins"
    # an __init__.py here would replace Twisted's own and hide every other plugin
    assert not (plugins / "__init__.py").exists()
    assert (plugins / "imcluster_plugins.py").is_file()
    # we install nothing else under twisted/
    assert sorted(p.name for p in (site / "twisted").iterdir()) == ["plugins"]
    assert sorted(p.name for p in plugins.iterdir() if p.suffix == ".py") == sorted(
        p.name for p in (ROOT / "twisted" / "plugins").glob("*.py"))
    # migrations ship with the package, or `imcluster migrate` finds nothing to apply
    assert sorted(p.name for p in (site / "imcluster" / "migrations").glob("*.sql")) == sorted(
        p.name for p in (ROOT / "imcluster" / "migrations").glob("*.sql"))


def test_editable_compat_install_lists_daemons(tmp_path):
    """The README's editable install must leave the daemons visible to twistd (the default mode hides them)."""
    command = _readme_editable_command()
    assert "editable_mode=compat" in command
    src = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _pip_install(python, "-e", str(src), "--config-settings", "editable_mode=compat")
    help_text = _twistd_help(python, tmp_path)
    for daemon in DAEMONS:
        assert re.search(rf"^\s+{daemon}\s", help_text, re.M), help_text
    package, plugin = _imported_from(python, tmp_path)
    assert package.is_relative_to(src) and plugin.is_relative_to(src)


def test_plugins_folder_clean():
    """A tracked __init__.py or dropin.cache under twisted/plugins breaks plugin discovery for every user."""
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "twisted/plugins/dropin.cache"], cwd=ROOT)
    assert ignored.returncode == 0, "dropin.cache must be in .gitignore"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not re.search(r"(^|/)dropin\.cache$", tracked, re.M)


def test_installed_processor_moderates_with_the_shipped_word_list(tmp_path):
    """Installed from a wheel, the keyword filter found no etc/badwords.txt and accepted everything."""
    python = _venv(tmp_path / "venv")
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(src)])
    [wheel] = wheels.glob("imcluster-*.whl")
    _pip_install(python, str(wheel))
    code = ("from imcluster.config import PROCESSOR, load_config\n"
            "from imcluster.processor.filters import load_filters, default_words_path\n"
            "[f] = load_filters(load_config(PROCESSOR, {}, environ={}))\n"
            "print(default_words_path())\n"
            "print(f.check({'body': {'text': 'you fucking idiot'}}).action, len(f.words))\n")
    path, verdict = _run([str(python), "-I", "-c", code], cwd=tmp_path).stdout.strip().splitlines()
    assert Path(path).is_relative_to(_site_packages(python)), path
    action, n = verdict.split()
    assert action == "reject" and int(n) > 10
