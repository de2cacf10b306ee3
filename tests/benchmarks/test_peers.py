"""The peer baselines of benchmarks/peers/ run (tiny dims, CPU, gloo) and count FLOPs as the llm recipe does."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))


def test_one_flops_formula_for_ours_and_the_peers():
    import torch
    from flops import flops_per_token
    from naive_fsdp2 import DIMS, build_model

    from scaleforge.models.llm.recipe import LLMRecipe
    from scaleforge.models.llm.model import LLMModelConfig

    recipe = LLMRecipe(LLMModelConfig(preset="1b"), job_cfg=None)
    with torch.device("meta"):
        _, n_ours = build_model("ours", DIMS["ours"], 2048)
        _, n_llama = build_model("llama", DIMS["llama"], 2048)
        gpt, n_gpt = build_model("gpt", DIMS["gpt"], 2048)
    assert n_ours == n_llama == recipe.matmul_params()
    assert flops_per_token(n_ours, 16, 16, 128, 2048) == recipe.flops_per_sample() / 2048
    assert abs(sum(p.numel() for p in gpt.parameters()) / 1e9 - 0.94) < 0.005  # the 0.94B GPT yardstick


@pytest.mark.slow
def test_naive_fsdp2_trains_tiny():
    arch = "llama"  # the plain Llama blocks; the GPT blocks and our model build in the test above
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers/naive_fsdp2.py"), "--arch", arch, "--tiny",
                        "--steps", "3", "--warmup", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MASTER_PORT": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res["arch"] == arch and res["tokens_per_s_per_gpu"] > 0 and "error" not in res
    assert 4.0 < res["final_loss"] < 7.0  # ~ln(256) for random tokens: the loss is computed, not NaN


def test_failed_row_is_named_by_its_exception_not_torchruns_banner():
    from compare import _error_line

    log = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nImportError: cannot import name 'X' from "
           "'torch.distributed.fsdp'\nE1206 failed (exitcode: 1)\ntorch.distributed.elastic.multiprocessing.errors"
           ".ChildFailedError: \n" + "=" * 60 + "\nRoot Cause (first observed failure):\n  exitcode  : 1\n" + "=" * 60)
    assert _error_line(log) == "ImportError: cannot import name 'X' from 'torch.distributed.fsdp'"
    assert _error_line("step 3\nloss nan\n" + "=" * 20) == "loss nan"


def test_torchtitan_result_line_counts_matmul_parameters_and_median_step(capsys, monkeypatch):
    import json

    import torch
    from flops import flops_per_token, mfu
    from torchtitan_common import print_result

    model = torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(10, 8), "out": torch.nn.Linear(8, 10)})
    dims = {"n_layers": 2, "n_heads": 2, "dim": 8, "seq": 16}
    monkeypatch.setenv("RANK", "0")
    print_result("titan", model, dims, 3, [9.0, 0.5, 0.25, 1.0], 1, 2 * 2**30)
    res = json.loads(capsys.readouterr().out.removeprefix("RESULT "))
    fpt = flops_per_token(8 * 10 + 10, 2, 2, 4, 16)
    assert res["params_matmul"] == 90 and res["flops_per_token"] == fpt and res["steps_timed"] == 4
    assert res["tokens_per_s_per_gpu"] == 3 * 16 / 0.5 and res["mfu"] == mfu(96.0, fpt)
    assert res["stack"] == "titan" and res["peak_mem_gib"] == 2.0
    monkeypatch.setenv("RANK", "1")
    print_result("titan", model, dims, 3, [1.0, 1.0], 0, 0.0)
    assert capsys.readouterr().out == ""


def test_random_tokens_are_shifted_pairs_seeded_by_rank():
    from torchtitan_common import RandomTokens

    x, y = next(iter(RandomTokens(50, 16, rank=0)))
    assert sorted(x) == ["input"] and x["input"].shape == y.shape == (16,)
    assert int(x["input"].max()) < 50
    x1, _ = next(iter(RandomTokens(50, 16, rank=1, positions=True)))
    assert not x1["input"].equal(x["input"]) and x1["positions"].tolist() == list(range(16))
    assert next(iter(RandomTokens(50, 16, rank=0)))[0]["input"].equal(x["input"])
