"""The command line's table of lazily imported subcommands. No mount."""
import json
import os
import subprocess
import sys

import pytest

from unionfs import cli

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")


def modules_after(code):
    """The project's and click's modules loaded by `code`, run in a fresh interpreter."""
    probe = (f"import sys\n{code}\nimport json\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('click', 'runner', 'bench', 'unionfs', 'pyfuse3', 'trio'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_loading_the_command_line_loads_no_command():
    assert modules_after("import unionfs.cli") == {"unionfs", "unionfs.cli"}


def test_fuse_unionfs_parses_its_arguments_without_click():
    loaded = modules_after("from unionfs.cli import fuse\n"
                           "fuse.parse(['overlay', '/mnt', '-o', 'lowerdir=/a:/b,noatime'])")
    assert not {m for m in loaded if m.split(".")[0] in ("click", "runner", "pyfuse3", "trio")}


def test_unionfs_mount_loads_no_runner_and_no_benchmark():
    loaded = modules_after("from unionfs.cli import load_command\nload_command('mount')")
    assert "click" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("runner", "bench", "pyfuse3", "trio")}


def test_every_entry_names_a_module_and_an_attribute():
    for name, target in cli.COMMANDS.items():
        module, _, attr = target.partition(":")
        assert module and attr, name
    assert {"pull", "push", "load", "save", "commit", "images", "image", "ps", "rm", "daemon",
            "stats", "which", "events", "mount", "umount", "run", "bench"} <= set(cli.COMMANDS)


def test_a_command_whose_module_is_missing_is_absent(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "unionfs.cli.no_such_module:ghost")
    monkeypatch.setitem(cli.COMMANDS, "phantom", "no_such_package.cli:phantom")
    monkeypatch.setitem(cli.COMMANDS, "nameless", "unionfs.cli.mount:no_such_command")
    for name in ("ghost", "phantom", "nameless"):
        assert cli.load_command(name) is None
    assert not cli.is_installed("ghost") and not cli.is_installed("phantom")
    group = cli.command_group()
    assert "ghost" not in group.list_commands(None)
    with pytest.raises(SystemExit) as exit_:
        group.main(["ghost"], prog_name="unionfs", standalone_mode=True)
    assert exit_.value.code == 2


def test_a_command_whose_own_import_fails_is_an_error_not_absent(monkeypatch, tmp_path):
    (tmp_path / "brokencmd.py").write_text("import no_such_dependency_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", "brokencmd:broken")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_anywhere"):
        cli.load_command("broken")


def test_help_lists_exactly_the_installed_commands():
    result = subprocess.run([UNIONFS, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:", 1)[1].split()
    names = {word for word in listed if word in cli.COMMANDS}
    assert names == {name for name in cli.COMMANDS if cli.is_installed(name)}
    assert {"mount", "umount", "run"} <= names
