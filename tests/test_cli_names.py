"""Every command's --help through the real entry point, and one name per concept across commands:
the old names stay accepted but are not advertised."""
import sys

import click
import pytest

from immunizer.cli import cli, main
from immunizer.options import Option

OLD_NAMES = {"--db": "--store", "--manifest": "--release", "--adaptive-manifest": "--adaptive-release"}
"""Names no command advertises any more (each still works where it was used), and the one that replaced it."""
CONCEPTS = {
    "--store": "review store",
    "--release": "immunize output directory",
    "--candidate": "weights checked against a release",
    "--out": "directory a command writes",
}


def commands(group=cli, path=(), groups=False):
    """(path, command) for every command under `group`; with `groups`, the groups themselves too."""
    if groups:
        yield path, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name), groups)
        else:
            yield (*path, name), command


def help_text(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["immunizer", *args, "--help"])
    try:
        main()
    except SystemExit as exc:  # main() exits only on errors
        pytest.fail(f"`immunizer {' '.join(args)} --help` exited {exc.code}")
    return capsys.readouterr().out


def test_every_help_shows_and_advertises_only_current_names(monkeypatch, capsys):
    walked = [path for path, _ in commands(groups=True)]
    assert ("review", "user", "add") in walked and ("review", "rubric") in walked and len(walked) > 20
    for path in walked:
        text = help_text(monkeypatch, capsys, *path)
        assert text.startswith("Usage: ") and " ".join(path) in text.splitlines()[0], path
        for old, new in OLD_NAMES.items():
            assert f"{old} " not in text and f"{old}\n" not in text, f"`{' '.join(path)} --help` shows {old}; it is {new} now"
    assert "--store" in help_text(monkeypatch, capsys, "review", "stats")
    assert "--release" in help_text(monkeypatch, capsys, "scan")


def test_one_name_one_concept():
    flags: dict[str, list] = {}
    for path, command in commands():
        for param in command.params:
            if isinstance(param, click.Option):
                shown = [o for o in param.opts if not (isinstance(param, Option) and o in param.old_names)]
                for name in shown:
                    flags.setdefault(name, []).append((path, param))
    for path, param in flags["--out"]:  # a directory everywhere (a single file is --report)
        assert param.type.file_okay is False and param.type.dir_okay is True, path
    for path, param in flags["--release"]:
        assert param.type.file_okay is False and param.name == "release_dir", path
    for path, param in flags["--store"]:
        assert param.name == "store_url", path
    names = {path: {o for p in command.params for o in getattr(p, "opts", ())} for path, command in commands()}
    for old, new in OLD_NAMES.items():
        assert old not in flags, f"{old} is advertised by {[p for p, _ in flags[old]]}; say {new}"
    assert {p for p, opts in names.items() if "--store" in opts} >= {("gate",), ("cycle",), ("review", "stats")}
    assert set(CONCEPTS) <= set(flags)


def parse(path, args):
    command = cli
    for name in path:
        command = command.commands[name]
    return command.make_context(" ".join(path), list(args)).params


@pytest.mark.parametrize("path, old, new, dest", [
    (("review", "stats"), ["--db", "x.db"], ["--store", "x.db"], "store_url"),
    (("gate",), ["--report", "r.json", "--policy", "release", "--db", "x.db"],
     ["--report", "r.json", "--policy", "release", "--store", "x.db"], "store_url"),
    (("scan",), ["--manifest", "DIR", "--candidate", "C"], ["--release", "DIR", "--candidate", "C"], "release_dir"),
    (("scan",), ["--release", "DIR", "--candidate", "C", "--base", "M"],
     ["--release", "DIR", "--candidate", "C", "--release-model", "M"], "base_dir"),
    (("verify",), ["--manifest", "DIR", "--model", "M"], ["--release", "DIR", "--candidate", "M"], "model_dir"),
    (("calibrate",), ["--model", "{tmp}"], ["--release", "{tmp}"], "release_dir"),
    (("extrapolate",), ["--manifest", "{tmp}", "--out", "o"], ["--release", "{tmp}", "--out", "o"], "release_dir"),
    (("attack",), ["--model", "tiny", "--out", "o", "--adaptive-manifest", "R"],
     ["--model", "tiny", "--out", "o", "--adaptive-release", "R"], "adaptive_manifest"),
    (("eval",), ["--model", "tiny", "--out", "e.json"], ["--model", "tiny", "--report", "e.json"], "out_file"),
    (("compare",), ["--before", "a", "--after", "b", "--harmful", "3", "--safe", "2"],
     ["--before", "a", "--after", "b", "--n-harmful", "3", "--n-safe", "2"], "n_harmful"),
])
def test_old_names_still_work(tmp_path, path, old, new, dest):
    fill = [[a.format(tmp=tmp_path) for a in args] for args in (old, new)]
    before, after = parse(path, fill[0]), parse(path, fill[1])
    assert before == after and before[dest] is not None


def test_an_old_flag_through_the_entry_point(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(sys, "argv", ["immunizer", "review", "stats", "--db", str(tmp_path / "r.db")])
    main()
    assert json.loads(capsys.readouterr().out)["queue"]["open"] == 0


def test_a_missing_option_names_the_current_flag(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["immunizer", "review", "stats"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'--store'" in err and "--db" not in err


def test_help_and_review_start_without_torch():
    """`immunizer --help`, `immunizer review --help` and `from immunizer import ...` of the light parts import
    neither torch nor transformers (seconds each): a reviewer's command starts at once. The API names that do
    need them still load on first use, and `immunizer.immunize` stays the function after its module is imported."""
    import subprocess

    probe = ("import sys, runpy; sys.argv = ['immunizer', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('immunizer', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    for args in (["--help"], ["review", "--help"], ["attack", "--help"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120).stdout
        assert "Usage:" in out and out.strip().splitlines()[-1] == "HEAVY []", (args, out[-500:])
    api = ("import sys, immunizer, immunizer.settings, immunizer.launch; assert 'torch' not in sys.modules\n"
           "from immunizer import immunize; import immunizer.immunize as module\n"
           "from immunizer import immunize as again, load_config, load_manifest\n"
           "assert callable(immunize) and immunize is again is module and 'torch' in sys.modules\n"
           "assert callable(load_config) and callable(load_manifest)\nprint('ok')")
    assert subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, timeout=120).stdout.strip() == "ok"
