"""Faults a demanding user or an adversary meets (issue 20): bad text, damaged checkpoints, a
full disk, bad configuration, signals, huge seeds, replayed metrics, a cut-short gzip file.

Each test reproduces the failure first: it fails on the code before its fix.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, TINY
from safejax import cli, errors, native_logs
from safejax.data import scores, sources
from safejax.data.quarantine import QUARANTINE
from safejax.safety import documents, labeled, labeler

LONE = '{"id": "s", "text": "abc \\ud800 def"}'  # valid JSON; the string UTF-8 cannot hold
PAIR = '{"id": "p", "text": "a smile \\ud83d\\ude00 here"}'  # an escaped pair is a real character


def _lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---- 1. a lone surrogate escape is set aside where it is read -------------------------------

def test_lone_surrogate_is_quarantined_with_file_and_line(tmp_path):
    path = _lines(tmp_path / "s.jsonl", [PAIR, LONE, '{"id": "d", "turns": [{"role": "user", "text": "\\udfff"}]}'])
    QUARANTINE.reset()
    assert [r["id"] for r in sources.iter_records([path])] == ["p"]
    assert [r["id"] for r in sources.iter_records([path], kind="dialogue")] == []
    assert QUARANTINE.counts()["lone_surrogate"] == 2  # lines 2 and 3, each once
    with pytest.raises(sources.LoneSurrogate, match=r"turns\[0\]\.text"):
        sources.loads(b'{"turns": [{"role": "user", "text": "\\udfff"}]}')
    with pytest.raises(sources.LoneSurrogate, match="a key of the record"):
        sources.loads('{"\\ud800": 1}')


def test_lone_surrogate_in_the_tf_data_reader_is_set_aside(tmp_path):
    path = _lines(tmp_path / "s.jsonl", [PAIR, LONE])
    QUARANTINE.reset()
    ds = sources.JsonlDataSource([path], validation_permille=0).get_dataset("train", shuffle=False)
    assert [x["id"] for x in ds.as_numpy_iterator()] == [b"p"]
    assert QUARANTINE.counts() == {"lone_surrogate": 1}


def test_data_stats_sets_a_lone_surrogate_aside(tmp_path, capsys):
    path = _lines(tmp_path / "s.jsonl", [PAIR, LONE])
    quarantine = tmp_path / "q.jsonl"
    assert cli.main(["data", "stats", "raw", f"--gin.CORPUS=['{path}']", "--quarantine", str(quarantine)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 1, report
    [entry] = [json.loads(line) for line in open(quarantine)]
    assert (entry["reason"], entry["file"], entry["line"], entry["detail"]) == ("lone_surrogate", path, 2, "text")


def test_train_on_a_lone_surrogate_only_corpus_is_a_one_line_error(tmp_path, capsys):
    path = _lines(tmp_path / "s.jsonl", [LONE])
    code = cli.main(["train", f"--gin_file={TINY}", f"--workdir={tmp_path / 'run'}",
                     *[f"--gin.{b.replace(' ', '')}" for b in FAST], f"--gin.jsonl_lm_task.files=['{path}']",
                     "--gin.DataConfig.eval_batches=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no training examples" in err[0], err


def test_labeled_readers_set_aside_or_refuse_a_lone_surrogate(tmp_path):
    path = _lines(tmp_path / "l.jsonl", [json.dumps({"id": "a", "text": "fine", "score": 1}),
                                          LONE[:-1] + ', "score": 2}'])
    result = labeled.load_llm_labels(path)
    assert [e.text for e in result.examples] == ["fine"]
    assert result.set_aside == [(f"llm:{path}:2", "lone surrogate escape in text")]
    with pytest.raises(errors.UserError, match="line 2: lone surrogate escape in text"):
        documents.load_labeled_file(path)
    with pytest.raises(errors.UserError, match="line 1: lone surrogate escape in id"):
        scores.read_scores(_lines(tmp_path / "scores.jsonl", ['{"id": "\\ud800", "score": 1}']))


@pytest.mark.parametrize("reply", ['{"score": 1, "reason": "\\ud800"}', '{"score": 1, "reason": "x\ud800"}'])
def test_a_reply_with_a_lone_surrogate_is_invalid(reply):
    with pytest.raises(labeler.InvalidReply, match="lone surrogate"):
        labeler.parse_reply(reply)


def test_label_never_sends_a_lone_surrogate_and_keeps_its_labels(tmp_path, monkeypatch):
    from test_labeler import MODEL, FakeLLM
    from safejax.safety.openai_client import ChatClient, ChatEndpoint

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    fake = FakeLLM()
    try:
        path = _lines(tmp_path / "in.jsonl", [json.dumps({"id": "a", "text": "plain score=2"}), LONE])
        out = tmp_path / "out"
        for run in range(2):
            client = ChatClient(ChatEndpoint(base_url=fake.url, model=MODEL, timeout_s=5, max_retries=0))
            summary = labeler.label_files([path], str(out), client, labeler.LabelConfig(progress_bar=False))
            assert (summary["bad_input"], summary["labeled"] + summary["cached"]) == (1, 1)
        assert fake.requests == 1  # one text paid once; the bad one never sent
        [label] = [json.loads(line) for line in open(out / "labels.jsonl")]
        assert (label["id"], label["score"]) == ("a", 2)
        [entry] = [json.loads(line) for line in open(out / "quarantine.jsonl")]
        assert (entry["reason"], entry["line"]) == ("lone_surrogate", 2)
    finally:
        fake.chat.close()


# ---- 15. no native start-up logs on a CPU host --------------------------------------------

def _quiet_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    return {**env, "JAX_PLATFORMS": "cpu", "SAFEJAX_HUGE_PAGES": "0"}


@pytest.mark.slow
def test_import_safejax_then_tensorflow_prints_nothing():
    code = "import safejax, tensorflow as tf, jax; tf.constant(1) + 1; jax.devices()"
    done = subprocess.run([sys.executable, "-c", code], env=_quiet_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    loud = subprocess.run([sys.executable, "-c", code], env={**_quiet_env(), native_logs.SWITCH: "1"},
                          capture_output=True, text=True, timeout=300)
    assert "oneDNN" in loud.stderr or "absl::InitializeLog" in loud.stderr  # what is being kept off


@pytest.mark.slow
def test_data_stats_prints_its_report_and_nothing_on_stderr(tmp_path):
    done = subprocess.run([sys.executable, "-m", "safejax.cli", "data", "stats", "raw", "--max_documents", "5"],
                          env=_quiet_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["documents"] == 5


# ---- 12. replayed metrics rows, a gzip file cut short ---------------------------------------

def test_a_resumed_run_drops_the_metrics_rows_past_its_checkpoint(tmp_path):
    from safejax.train.metrics import MetricsWriter

    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 11, "lo')  # killed mid-line
    writer = MetricsWriter(str(tmp_path), start_step=4)
    writer.write(5, {"loss": 0.5})
    writer.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


@pytest.fixture
def cut_gzip(tmp_path):
    import gzip

    path = tmp_path / "cut.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(2000):
            f.write(json.dumps({"id": f"d{i}", "text": f"words and more words {i} " * 8}) + "\n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    lines = sources.gzip_lines_if_cut_short(str(path))
    assert 0 < lines < 2000
    return str(path), lines


def test_a_gzip_file_cut_short_is_reported_as_truncated_by_both_readers(cut_gzip):
    path, lines = cut_gzip
    QUARANTINE.reset()
    assert len(list(sources.iter_records([path]))) == lines
    assert QUARANTINE.counts() == {"truncated_file": 1}
    QUARANTINE.reset()
    ds = sources.JsonlDataSource([path], validation_permille=0).get_dataset("train", shuffle=False)
    assert len(list(ds.as_numpy_iterator())) == lines
    assert QUARANTINE.counts() == {"truncated_file": 1}  # not a lone bad_json line


def test_a_whole_multi_member_gzip_file_is_not_cut_short(tmp_path):
    import gzip

    path = tmp_path / "two.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n') + gzip.compress(b'{"text": "b"}\n'))
    assert sources.gzip_lines_if_cut_short(str(path)) is None


# ---- 10. Ctrl-C mid-run, SIGTERM during start-up -------------------------------------------

@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_the_rerun_resumes_there(tmp_path):
    from test_cli import _env, _train_cmd, _wait_for_step

    cmd = _train_cmd(tmp_path, "TRAIN_STEPS=10000", "CHECKPOINT_EVERY=5000", "DataConfig.eval_batches=0")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and 3 <= summary["step"] < 10000
    assert os.listdir(tmp_path / "checkpoints") == [str(summary["step"])]
    again = _train_cmd(tmp_path, f"TRAIN_STEPS={summary['step'] + 1}", "CHECKPOINT_EVERY=5000",
                       "DataConfig.eval_batches=0")
    resumed = json.loads(subprocess.run(again, env=_env(), capture_output=True, text=True, check=True,
                                        timeout=300).stdout.strip().splitlines()[-1])
    assert (resumed["start_step"], resumed["step"]) == (summary["step"], summary["step"] + 1)


@pytest.mark.slow
def _wait_until_catching(proc, signum, timeout=300):
    """Waits until `proc` has a handler for `signum` (Linux: the SigCgt mask in /proc/PID/status)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{proc.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=60)
        time.sleep(0.005)


def test_sigterm_during_start_up_is_one_line_and_a_later_run_starts(tmp_path):
    from test_cli import _env, _train_cmd

    cmd = _train_cmd(tmp_path, "TRAIN_STEPS=2", "DataConfig.eval_batches=0")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_catching(proc, signal.SIGTERM)  # the CLI's handler: JAX, TensorFlow and seqio still to import
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out == "", (proc.returncode, out, err)
    assert err.strip().splitlines() == ["safejax: stopped by SIGTERM (the checkpoints written are kept); "
                                        "rerun the same command to go on"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2


# ---- 9. wrong-type and unparsable gin values, a read-only workdir --------------------------

@pytest.mark.parametrize("binding,message", [
    ("DecoderConfig.d_model='abc'", "DecoderConfig.d_model must be of type int, got 'abc'"),
    ("TRAIN_STEPS=[1", "in binding 'TRAIN_STEPS = [1': unparsable value"),
    ("DecoderConfig.dtype='float99'", "DecoderConfig.dtype must be a floating dtype (float32, bfloat16, float16), "
                                      "got 'float99'"),
    ("DecoderConfig.tie_embeddings=1", "DecoderConfig.tie_embeddings must be of type bool, got 1"),
    ("TrainConfig.seed=4294967296", "TrainConfig.seed must be an integer in [0, 2**32)"),
    ("TrainConfig.seed=-1", "TrainConfig.seed must be an integer in [0, 2**32)"),
])
def test_bad_gin_values_are_one_line_errors(capsys, tmp_path, binding, message):
    code = cli.main(["train", f"--gin_file={TINY}", f"--workdir={tmp_path}", f"--gin.{binding}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("safejax: error:"), err
    assert message in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir_is_a_one_line_error(capsys, tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o500)
    code = cli.main(["train", f"--gin_file={TINY}", f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"cannot write the workdir {workdir}: Permission denied" in err[0], err


def test_write_effective_config_names_an_unwritable_workdir(tmp_path):
    from safejax import config

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the workdir should be: no user can write into it
    with pytest.raises(errors.UserError, match=f"cannot write the workdir {blocker}/run"):
        config.write_effective_config(str(blocker / "run"))


# ---- 11. seeds beyond 32 bits ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [2**32, -1])
def test_sampling_seeds_outside_32_bits_are_refused(seed):
    from safejax.inference.params import SamplingParams

    SamplingParams(seed=2**32 - 1).validate(100, False)
    with pytest.raises(errors.UserError, match=r"seed=.*must be an integer in \[0, 2\*\*32\)"):
        SamplingParams(seed=seed).validate(100, False)


# ---- 17. a stable, documented MFU peak ------------------------------------------------------

EPYC = "vendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2596.134\nflags\t\t: fpu sse2 avx2 fma avx512f\n"
XEON = "vendor_id\t: GenuineIntel\ncpu MHz\t\t: 2100.000\nflags\t\t: fpu sse2 avx2 fma avx512f\n"
OLD = "vendor_id\t: GenuineIntel\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu sse2\n"


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle():
    from safejax import hardware

    assert hardware.cpu_formula_peak(EPYC, cores=2) == 2 * 2596e6 * 32  # AMD's AVX-512 on 256-bit pipes
    assert hardware.cpu_formula_peak(XEON, cores=4) == 4 * 2100e6 * 64
    assert hardware.cpu_formula_peak(OLD, cores=1) == 3000e6 * 8
    assert hardware.cpu_formula_peak("", cores=1) is None  # -> measured
    first, source = hardware.peak_flops()
    assert source in ("cpu_formula", "measured") and hardware.peak_flops() == (first, source)  # stable
    assert hardware.peak_flops(1e12) == (1e12, "configured")
