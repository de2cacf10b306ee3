"""`launch` as users run it (the console script in a subprocess): every config / flag / resume check before any
worker starts, for local, Slurm and dry-run launches; the first failing rank's cause; Ctrl-C and SIGTERM; resume
with a changed config; `--resume none` into an existing run; planning without triton."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
QUIET = ["metrics.plot=false", "metrics.progress_bar=false", "metrics.wandb.mode=disabled"]


def launch(*args, cwd, env=None, timeout=240):
    return subprocess.run([str(BIN / "launch"), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env)


def one_line_error(r, *fragments):
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "rank" not in r.stderr.lower().replace("node-rank", ""), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(f in lines[0] for f in fragments), r.stderr


@pytest.mark.parametrize("override, mode, expected", [
    ("optim.name=adamm", ["--print-config"], "did you mean adamw?"),
    ("data.kind=webdatset", ["--dry-run"], "did you mean webdataset?"),
    ("optim.betas=[0.9]", ["--slurm", "--dry-run"], "optim.betas: adamw takes two values"),
    ("optim.name=adamm", ["--slurm"], "optim.name: unknown optimizer 'adamm'"),
    ("optim.betas=[0.9]", ["--nproc", "2"], "optim.betas"),
    ("data.sources=[{name: web, shards: 'nowhere/s-{0..3}.tar'}]", ["--slurm", "data.kind=webdataset"],
     "nowhere/s-0.tar"),
])
def test_config_mistakes_fail_before_any_worker_or_submission(tmp_path, override, mode, expected):
    r = launch("--config", "lm_tiny.yaml", override, *mode, cwd=tmp_path)
    one_line_error(r, expected)
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


@pytest.mark.parametrize("flags, expected", [
    (["--node-rank", "2", "--nnodes", "2", "--master", "127.0.0.1:29500"], "--node-rank 2: must be in [0, --nnodes 2)"),
    (["--nnodes", "2", "--master", "localhost"], "--master localhost: expected HOST:PORT"),
    (["--nodes", "2"], "--nodes N is for Slurm"),
    (["--slurm", "--nnodes", "2"], "with --slurm use --nodes N"),
    (["--slurm", "--resume", "nowhere"], "--resume nowhere"),
])
def test_multi_node_and_slurm_flags_are_checked(tmp_path, flags, expected):
    one_line_error(launch("--config", "lm_tiny.yaml", *flags, cwd=tmp_path), expected)


def test_planning_needs_no_triton(tmp_path):
    (tmp_path / "nokernels").mkdir()
    (tmp_path / "nokernels" / "triton.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "nokernels")}
    r = launch("--config", "sana_1.6b.yaml", "--slurm", "--nodes", "2", "--dry-run", cwd=tmp_path, env=env)
    assert "#SBATCH --nodes=2" in r.stdout and "1.60B total" in r.stdout, r.stderr[-3000:]
    # the plan, then what this machine would refuse: the config's shards are not here
    assert r.returncode == 2 and r.stderr.startswith("error: data.sources[0] (latents).shards: 1000 of 1000"), \
        r.stderr[-3000:]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished 6-step lm_tiny run (checkpoints at 3 and 6; steps 1, 2, 4, 5 read deferred)."""
    root = tmp_path_factory.mktemp("launch_cmds")
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "trainer.max_steps=6", "checkpoint.interval=3", *QUIET,
               cwd=root, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    (root / "first_run.out").write_text(r.stdout)
    return root


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEFORGE_FAULT_")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


@pytest.mark.slow
def test_resume_with_another_model_or_recipe_is_refused_and_the_run_untouched(lm_run, tmp_path):
    run = lm_run / "runs" / "lm_tiny"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "trainer.max_steps=6", "model.n_layers=4", cwd=lm_run)
    one_line_error(r, "model.n_layers: None there, 4 now", "not in the checkpoint", "--resume none")
    r = launch("--config", "sana_tiny.yaml", "--nproc", "1", "run.name=other", f"--resume={run}", cwd=lm_run)
    one_line_error(r, "is a 'llm' checkpoint, the config's recipe is 'sana'")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before and not (lm_run / "runs" / "other").exists()
    r = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(run), "--format", "hf", "--out",
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_resume_none_moves_the_old_run_aside(lm_run):
    run = lm_run / "runs" / "lm_tiny"
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "trainer.max_steps=2", "--resume", "none",
               "run.name=fresh_copy", *QUIET, cwd=lm_run, env=_env())  # a run with nothing to move
    assert r.returncode == 0 and "moved the previous run" not in r.stdout, r.stderr[-2000:]
    import shutil

    shutil.copytree(run, lm_run / "runs" / "again")
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "trainer.max_steps=2", "--resume", "none",
               "run.name=again", *QUIET, cwd=lm_run, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume none: moved the previous run" in r.stdout
    old = [p for p in (lm_run / "runs").iterdir() if p.name.startswith("again.old-")]
    assert len(old) == 1 and sorted(p.name for p in (old[0] / "checkpoints").glob("step_*")) == [
        "step_00000003", "step_00000006"]
    new = lm_run / "runs" / "again"
    steps = [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2]
    assert sorted(p.name for p in (new / "checkpoints").glob("step_*")) == ["step_00000002"]


@pytest.mark.slow
def test_first_failing_rank_cause_comes_first(tmp_path):
    r = launch("--config", "lm_tiny.yaml", "--nproc", "2", "trainer.max_steps=6", "trainer.max_nonfinite_steps=2",
               *QUIET, cwd=tmp_path, env=_env(SCALEFORGE_FAULT_NAN_STEPS="1,2,3"))
    assert r.returncode == 1
    ours = r.stderr[r.stderr.index("\nerror: worker rank"):].strip().splitlines()
    assert ours[0].startswith("error: worker rank ") and "failed first (exit code 1): TrainingError:" in ours[0]
    assert "no checkpoint was written before it" in ours[0]  # not "the last good checkpoint is kept"
    assert ours[1].endswith("traceback:") and ours[-1].startswith("error: worker rank ")
    assert "TrainingError" in ours[-1]


def _start(tmp_path, name, *extra):
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    p = subprocess.Popen([str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "2", f"run.name={name}",
                          "trainer.max_steps=100000", "checkpoint.interval=0", "trainer.log_interval=1", *QUIET,
                          *extra],
                         stdout=out, stderr=err, cwd=tmp_path, env=_env(PYTHONUNBUFFERED="1"))
    deadline = time.time() + 180
    while "step 2/" not in (tmp_path / f"{name}.out").read_text():
        assert p.poll() is None and time.time() < deadline, (tmp_path / f"{name}.err").read_text()[-3000:]
        time.sleep(0.5)
    return p


def _finish(p, tmp_path, name):
    p.wait(timeout=180)
    return (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_writes_a_checkpoint_and_exits_with_one_line(tmp_path, sig, rc):
    p = _start(tmp_path, "sig")
    p.send_signal(sig)
    out, err = _finish(p, tmp_path, "sig")
    assert p.returncode == rc, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    ckpts = sorted((tmp_path / "runs" / "sig" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    assert err.strip().splitlines()[-1] == (f"stopped by {sig.name}: last checkpoint {Path('runs/sig/checkpoints')}/"
                                            f"{ckpts[0].name}; run the same command to resume")


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    name = f"abort{os.getpid()}"
    # 16 micro-batches per rank and step: the workers are still finishing their step when the second Ctrl-C
    # comes (after a finished stop the launcher is already on its way out)
    p = _start(tmp_path, name, "trainer.global_batch_size=128")
    p.send_signal(signal.SIGINT)
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = _finish(p, tmp_path, name)
    assert p.returncode == 130 and "aborted: workers killed without a checkpoint" in err, err[-3000:]
    from scaleforge.platform.checkpoint import find_latest

    assert find_latest(tmp_path / "runs" / name / "checkpoints") is None
    time.sleep(1)
    workers = subprocess.run(["pgrep", "-f", f"runs/{name}/config.yaml"], capture_output=True, text=True)
    assert workers.stdout.split() == []  # no worker left running


@pytest.mark.slow
def test_run_says_what_it_wrote_and_reports_honest_throughput(lm_run):
    out = (lm_run / "first_run.out").read_text()
    run = Path("runs") / "lm_tiny"
    assert f"checkpoint written: {run / 'checkpoints' / 'step_00000003'}" in out
    assert f"checkpoint written: {run / 'checkpoints' / 'step_00000006'}" in out
    summary = out[out.index("finished: "):]
    assert f"run directory {run}" in summary and "last checkpoint" in summary and "step_00000006" in summary
    assert f"scaleforge export --run {run} --format hf --out" in summary
    recs = [json.loads(line) for line in (lm_run / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    rates = sorted(r["samples_per_s"] for r in recs[1:])  # step 1 includes one-time set-up
    median = rates[len(rates) // 2]
    # the deferred read must not make the steps read at once (3: checkpoint, 6: final) look many times faster
    assert max(rates) < 4 * median, rates


@pytest.mark.slow
def test_resume_rules(lm_run, tmp_path):
    run = lm_run / "runs" / "lm_tiny"
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "trainer.max_steps=6",
               f"--resume={run / 'checkpoints' / 'latest'}", "run.name=same_length", cwd=lm_run, env=_env())
    assert r.returncode == 0 and "nothing to do: the checkpoint is at step 6" in r.stdout, r.stderr[-2000:]
    assert not (lm_run / "runs" / "same_length").exists()  # no worker started, nothing written
    (tmp_path / "shards").mkdir()
    one_line_error(launch("--config", "lm_tiny.yaml", f"--resume={tmp_path / 'shards'}", cwd=lm_run),
                   "not a checkpoint; --resume takes a run directory")
    import shutil

    shutil.copytree(run, lm_run / "runs" / "longer")
    r = launch("--config", "lm_tiny.yaml", "--nproc", "1", "run.name=longer", "trainer.max_steps=8",
               "optim.lr=1e-3", *QUIET, cwd=lm_run, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resume: the config's LR schedule applies from step 7 (optim.lr 0.003 -> 0.001; "
            "trainer.max_steps 6 -> 8)") in r.stdout
    from scaleforge.platform.schedule import lr_factor

    recs = {json.loads(line)["step"]: json.loads(line) for line in
            (lm_run / "runs" / "longer" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line}
    for step in (7, 8):  # the new base LR on the new cosine, from the first resumed step
        assert recs[step]["lr"] == pytest.approx(1e-3 * lr_factor(step - 1, "cosine", 5, 8, 0.1), rel=1e-9)
