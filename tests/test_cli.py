"""The CLI fails like a Unix tool and survives interruption: real subprocesses, real signals.

Expected errors: one line `fusealign <command>: error: …` on stderr, exit 2, no traceback (`--debug` shows
it). SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the resume command is printed,
exit 143 / 130; resuming reproduces the uninterrupted loss curve. Without a terminal, progress is plain lines.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusealign import cli
from fusealign.engine.checkpoint import latest_checkpoint, load_trainer_state
from fusealign.engine.config import SFTConfig
from fusealign.engine.recipes import run_sft

FUSEALIGN = [sys.executable, "-m", "fusealign"]


def run(*args, cwd, env=None, timeout=300):
    return subprocess.run([*FUSEALIGN, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(r, command: str, fragment: str):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fusealign {command}: error: ") and fragment in last, last
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                     b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    (d / "missing_field.jsonl").write_text('{"prompt": "movie the", "chosen": "good"}\n')
    (d / "not_a_model").mkdir()
    (d / "a_file").write_text("x")
    return d


ERRORS = [  # (args, command, fragment of the one-line message)
    (["dpo", "--data", "empty.jsonl"], "dpo", "empty data set"),
    (["dpo", "--data", "no_such.jsonl"], "dpo", "no such file"),
    (["dpo", "--data", "latin1.jsonl"], "dpo", "latin1.jsonl:2: not UTF-8 (byte 0xe9 at byte offset 63"),
    (["rm", "--data", "missing_field.jsonl"], "rm", "missing_field.jsonl:1: missing field 'rejected'"),
    (["sft", "--model", "not_a_model"], "sft", "--model 'not_a_model': no config.json there"),
    (["dpo", "--sft-model", "not_a_model"], "dpo", "--sft-model 'not_a_model': no config.json"),
    (["ppo", "--reward-model", "not_a_model"], "ppo", "--reward-model 'not_a_model': no config.json"),
    (["sft", "--output-dir", "a_file/run"], "sft", "--output-dir 'a_file/run': cannot create or write it"),
    (["dpo", "--beta", "-1"], "dpo", "--beta must be a finite number > 0"),
    (["sft", "--device", "tpu"], "sft", "--device must be auto, cpu or cuda"),
    (["compare", "--preset", "huge"], "compare", "--preset must be one of"),
    (["compare", "--seeds", "9-0"], "compare", "--seeds: range '9-0' is reversed; write it low-high: 0-9"),
    (["compare", "--seeds", "0-3,2"], "compare", "--seeds: seed 2 is listed twice"),
    (["compare", "--seeds", "-1"], "compare", "--seeds: '-1' is negative"),
    (["ppo", "--loss-type", "grpo"], "ppo", "--loss-type: TRL's GRPO loss options apply to --advantage grpo or rloo"),
    (["ppo", "--advantage", "grpo", "--num-generations", "4", "--epsilon-high", "-1"], "ppo",
     "--epsilon-high must be >= 0"),
    (["sft", "--report-to", "wandb"], "sft", "--report-to wandb: the wandb package is not installed (pip install wandb"),
    (["sft", "--report-to", "tensorboard"], "sft", "--report-to tensorboard: the tensorboard package is not installed"),
    (["sft", "--report-to", "mlflow"], "sft", "--report-to must be none, or one or more of tensorboard, wandb, trackio"),
    (["plot", "no_such_run"], "plot", "no_such_run: no metrics.jsonl there"),
]


@pytest.mark.parametrize("args,command,fragment", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_expected_errors_are_one_line(files, args, command, fragment, monkeypatch, capsys):
    """The first case runs as a real process (`python -m fusealign`: exit status 2, stderr); the others call
    `cli.main` in this process — the same code path from argument parsing to the exit code, without starting a
    Python with torch and transformers twenty times (about 4 s each on the 2-core CI machine)."""
    out = [] if "--output-dir" in args or command == "plot" else ["--output-dir", "run-" + command]
    t0 = time.perf_counter()
    device = [] if "--device" in args or command == "plot" else ["--device", "cpu"]
    if (args, command, fragment) == ERRORS[0]:
        r = run(*args, *out, *device, cwd=files)
    else:
        monkeypatch.chdir(files)
        code = cli.main([*args, *out, *device])
        r = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    one_line_error(r, command, fragment)
    if command != "plot" and "--output-dir" not in args:  # a run that fails before training leaves no directory
        assert not (files / ("run-" + command)).exists()
    # Paths and data are checked before any model is trained or loaded: these fail in seconds.
    assert time.perf_counter() - t0 < 60


def test_help_states_each_default_once():
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest in ("help",
                                                                                                       "debug"):
                continue
            text = " ".join(action.help.split())  # every flag states its default, once
            assert text.count("default:") == 1 or (command == "plot" and action.dest == "out"), \
                (command, action.option_strings, text)
    helps = {a.dest: " ".join(a.help.split()) for a in sub.choices["dpo"]._actions if a.help}
    assert helps["sft_model"].startswith("optional, with --model builtin only")
    assert helps["lr"].endswith("(default: 0.001 with --model builtin, 1e-06 with a model directory)")
    assert helps["bundle.beta"].endswith("(default: 0.5 with --model builtin, 0.1 with a model directory)")
    assert "(default: none)" not in helps["max_length"] and "1024 with a model directory" in helps["max_length"]
    ppo = " ".join(sub.choices["ppo"].format_help().split())
    assert '{"prompt": str or chat messages} per line' in ppo and "--reward-model RM_DIR" in ppo


def test_debug_shows_the_traceback(files):
    r = run("--debug", "dpo", "--data", "empty.jsonl", "--output-dir", "dbg", cwd=files)
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataError" in r.stderr
    r = run("dpo", "--data", "empty.jsonl", "--output-dir", "dbg2", cwd=files, env={"FUSEALIGN_DEBUG": "1"})
    assert "Traceback" in r.stderr


def test_cuda_out_of_memory_is_an_expected_error(monkeypatch, capsys):
    def oom(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(cli.RUNS, "sft", oom)
    assert cli.main(["sft", "--output-dir", "/tmp/unused-oom"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fusealign sft: error: out of GPU memory: lower --batch-size") and "20.00 GiB" in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.RUNS, "sft", bug)
    with pytest.raises(KeyError):
        cli.main(["sft", "--output-dir", "/tmp/unused-bug"])


def test_logs_without_a_terminal_are_plain_lines(tmp_path):
    r = run("sft", "--max-steps", "10", "--log-every", "5", "--output-dir", "s", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("sft step")]
    assert [x.split()[2] for x in lines] == ["5/10", "10/10"] and "loss=" in lines[0], r.stderr
    # A command that loads a model from disk: no transformers "Loading weights" bars either.
    ckpt = latest_checkpoint(tmp_path / "s")
    r = run("dpo", "--sft-model", str(ckpt), "--max-steps", "2", "--eval-samples", "4", "--output-dir", "d",
            "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "Loading" not in r.stderr, r.stderr


def _wait_for_steps(path: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and sum(1 for _ in open(path)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(path)


def test_sigterm_checkpoints_prints_resume_and_resume_is_exact(tmp_path):
    kw = dict(max_steps=40, save_every=1000, batch_size=8, device="cpu")
    run_sft(SFTConfig(output_dir=str(tmp_path / "full"), **kw))
    args = ["sft", "--max-steps", "40", "--save-every", "1000", "--batch-size", "8", "--device", "cpu",
            "--output-dir", "part"]
    p = subprocess.Popen([*FUSEALIGN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(tmp_path / "part" / "metrics.jsonl", 3, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    resume = next(x for x in err.splitlines() if "continue with: " in x).split("continue with: ", 1)[1]
    stopped = latest_checkpoint(tmp_path / "part")
    assert stopped is not None and 3 <= load_trainer_state(stopped)["step"] < 40
    cmd = shlex.split(resume)
    assert cmd[:2] == ["fusealign", "sft"] and cmd[-1] == "--resume"
    r = subprocess.run([*FUSEALIGN, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in b] == list(range(1, 41))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]


def test_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    args = ["sft", "--max-steps", "100000", "--save-every", "2", "--batch-size", "8", "--device", "cpu",
            "--output-dir", "run"]
    p = subprocess.Popen([*FUSEALIGN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 5, p)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, err[-2000:])
    ckpt = latest_checkpoint(tmp_path / "run")
    state = load_trainer_state(ckpt)  # complete and loadable
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert state["step"] >= 2
