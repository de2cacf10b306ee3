import subprocess
import sys

import pytest
import torch

import scaleforge.kernels as K


def test_set_and_use_backend_round_trip():
    before = K.get_backend()
    K.set_backend("torch")
    assert K.get_backend() == "torch"
    with K.use_backend("triton"):
        assert K.get_backend() == "triton"
    assert K.get_backend() == "torch"
    K.set_backend(before)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="not a kernel backend"):
        K.set_backend("cuda")
    with pytest.raises(ValueError, match="not a kernel backend"):
        K.rms_norm(torch.randn(2, 8), backend="cutlass")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard")
def test_triton_on_cpu_without_interpreter_names_the_fix():
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import scaleforge.kernels as K\n"
        "assert K.get_backend() == 'torch'\n"
        "try:\n    K.rms_norm(torch.randn(2, 8), backend='triton')\n"
        "except RuntimeError as e:\n    assert 'TRITON_INTERPRET' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_without_triton_uses_torch_references():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, scaleforge.kernels as K\n"
        "assert K.get_backend() == 'torch'\n"
        "x = torch.randn(2, 3, 16, 8)\n"
        "o = K.relu_linear_attention(x, x.abs(), x)\n"
        "assert o.shape == x.shape and torch.isfinite(o).all()\n"
        "try:\n    K.quantize_fp8(x, backend='triton')\n"
        "except RuntimeError as e:\n    assert 'not installed' in str(e); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_env_var_selects_default_backend():
    code = "import scaleforge.kernels as K; print(K.get_backend())"
    env = dict(__import__("os").environ, SCALEFORGE_KERNELS="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr
