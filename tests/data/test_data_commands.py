"""`scaleforge data ...` and `scaleforge export` errors as users meet them: the console script in a subprocess,
one `error:` line, exit 2, nothing half-written left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def sf(*args, cwd, check_rc=None, shell_pipe=None):
    if shell_pipe:
        cmd = f"{BIN / 'scaleforge'} {' '.join(args)} | {shell_pipe}"
        return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=cwd,
                              timeout=120)
    r = subprocess.run([str(BIN / "scaleforge"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    if check_rc is not None:
        assert r.returncode == check_rc, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def one_line_error(r, *fragments):
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), r.stderr


@pytest.mark.parametrize("flag, value", [("--n", "0"), ("--per-shard", "0"), ("--seq-len", "-3"), ("--size", "0")])
def test_synth_rejects_impossible_sizes(tmp_path, flag, value):
    args = {"--n": "4", "--per-shard": "2", "--seq-len": "8", "--size": "16"}
    args[flag] = value
    r = sf("data", "synth", "--kind", "tokens", "--out", "out", *[x for kv in args.items() for x in kv], cwd=tmp_path)
    one_line_error(r, flag, value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_synth_refuses_a_folder_with_older_shards(tmp_path):
    sf("data", "synth", "--kind", "tokens", "--out", "out", "--n", "4", "--per-shard", "1", "--seq-len", "8",
       cwd=tmp_path, check_rc=0)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    r = sf("data", "synth", "--kind", "tokens", "--out", "out", "--n", "2", "--seq-len", "8", cwd=tmp_path)
    one_line_error(r, "already holds 4 shard(s)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_pack_bad_line_leaves_no_shard(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "imgs" / f"{i}.jpg")
    lines = ['{"image": "0.jpg", "caption": "a"}', '{"image": "1.jpg", "caption": "b"}', '["not", "an", "object"]']
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    r = sf("data", "pack", "--images", "imgs", "--captions", "caps.jsonl", "--out", "packed", cwd=tmp_path)
    one_line_error(r, "caps.jsonl:3", "expected a JSON object", "list")
    assert not list((tmp_path / "packed").glob("*.tar"))
    assert not list((tmp_path / "packed").iterdir())  # no temporary folder left either


def test_inspect_directory_glob_and_broken_pipe(tmp_path):
    sf("data", "synth", "--kind", "tokens", "--out", "d", "--n", "30", "--per-shard", "1", "--seq-len", "8",
       cwd=tmp_path, check_rc=0)
    r = sf("data", "inspect", "d", cwd=tmp_path, check_rc=0)  # a directory: its .tar files
    assert "total: 30 shards, 30 samples" in r.stdout
    r = sf("data", "inspect", "'d/*.tar'", cwd=tmp_path, shell_pipe="cat")  # a quoted glob reaches us unexpanded
    assert r.returncode == 0 and "total: 30 shards" in r.stdout, r.stderr
    r = sf("data", "inspect", "'nowhere/*.tar'", cwd=tmp_path, shell_pipe="cat")
    assert r.returncode == 2 and "matches no file" in r.stderr and "shard-{000000..000009}.tar" in r.stderr
    r = sf("data", "inspect", "d", cwd=tmp_path, shell_pipe="head -n 2")
    assert r.stdout.count("\n") == 2
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_launch_names_a_source_of_garbage_shards_before_workers(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "shard-000000.tar").write_bytes(b"this is not a tar file" * 40)
    (d / "shard-000001.tar").write_bytes(b"\0" * 10240)  # an empty tar: only the end-of-archive marker
    r = subprocess.run([str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "2", "data.kind=webdataset",
                        "data.sources=[{name: web, shards: 'bad/shard-{000000..000001}.tar'}]"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    one_line_error(r, "source 'web'", "shard-000000.tar (unreadable", "shard-000001.tar (no sample)")
    assert "rank" not in r.stderr and not (tmp_path / "runs").exists()


def test_export_never_overwrites(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = sf("export", "--run", "runs/x", "--format", "hf", "--out", "out", cwd=tmp_path)
    one_line_error(r, "--out out: already exists and is not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
