"""The `sane-hf` shell: one line per user error (exit 1), usage errors exit 2, tracebacks only
with --debug, no Hub lookup for a local path that does not exist, passive OpenMP threads."""

import importlib
import os
import subprocess
import sys

import pytest

from sane_hf import cli


def run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SANE_HF_DEBUG"}
    environment.update({"OMP_NUM_THREADS": "1", **env})
    return subprocess.run(
        [sys.executable, "-m", "sane_hf", *argv],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_a_missing_local_path_is_one_line_and_never_a_hub_lookup(capsys, fake_hub):
    assert cli.main(["probe", "--model", "/no/such/dir", "--dataset", "/no/such/zoo"]) == 1
    assert capsys.readouterr().err == (
        "sane-hf probe: error: --model /no/such/dir: no such file or folder (and not a Hub id)\n"
    )
    assert fake_hub.requests == []


def test_usage_errors_exit_2_with_argparse_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--model", "m"])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, capsys, monkeypatch):
    """In process (the entry point prints what `main` raises as a traceback): one line without
    --debug, the exception itself with --debug or SANE_HF_DEBUG=1."""
    argv = ["pretrain", "--config", "tiny", "--dataset", str(tmp_path), "--max-grad-norm", "-1"]
    monkeypatch.delenv("SANE_HF_DEBUG", raising=False)
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (
        "sane-hf pretrain: error: max_grad_norm must be > 0 (null disables clipping), got -1.0\n"
    )
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("SANE_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        cli.main(argv)


def test_unexpected_errors_are_one_line_pointing_to_debug(monkeypatch, capsys):
    def broken(args):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(func=broken)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == (
        "sane-hf demo: error: 'NoneType' object has no attribute 'x' (AttributeError; rerun with "
        "--debug for the traceback)\n"
    )


def test_hub_http_errors_name_the_repo_and_status():
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(huggingface_hub.errors.Response.__module__.split(".")[0])
    request = http.Request("GET", "https://huggingface.co/api/models/user/sane/revision/main")
    error = HfHubHTTPError("401 Client Error", response=http.Response(401, request=request))
    line = cli.error_line(error)
    assert line.startswith("repo user/sane: HTTP 401") and "\n" not in line
    assert cli.error_line(KeyError("no column 'x'")) == "no column 'x'"


@pytest.mark.parametrize("busy", [True, False])
def test_passive_waiting_only_while_other_processes_keep_cpus_busy(monkeypatch, busy):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cli, "free_cpus", lambda: cpus - 1 if busy else cpus)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cli.configure_threads()
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if busy else None)
    assert os.environ["OMP_NUM_THREADS"] == str(cpus - 1 if busy else cpus)


def test_thread_settings_unless_the_user_chose():
    code = "import os, sane_hf.cli as c; c.configure_threads(); "
    code += "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="3")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["ACTIVE", "3"]


def test_threads_flag_sets_the_threads_before_the_command_runs(monkeypatch, capsys):
    chosen = []
    monkeypatch.setattr(cli, "configure_threads", chosen.append)
    cli.main(["--threads", "2", "probe", "--model", "/no/such/dir", "--dataset", "/no/such/zoo"])
    assert chosen == [2]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--threads", "0", "probe", "--model", "m", "--dataset", "d"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_free_cpus_is_within_the_affinity_mask():
    assert 1 <= cli.free_cpus() <= len(os.sched_getaffinity(0))


def test_demo_help_gives_the_time_and_mentions_quick():
    result = run_cli("demo", "--help")
    text = " ".join(result.stdout.split())
    assert "about a minute" in text and "--quick" in text


def test_pretrain_accepts_a_preset_by_name_in_help():
    text = " ".join(run_cli("pretrain", "--help").stdout.split())
    assert "tiny" in text and "cnn" in text and "resnet18" in text
