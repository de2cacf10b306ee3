"""Build (once) and locate the cached virtual environment that runs NVlabs' ``ps3-torch`` 0.1.3.

``ps3-torch`` pins ``transformers<=4.49`` and subclasses timm 1.0.15's ViT block, neither of which fits
the project's own environment, so the parity test runs it in a separate venv. That venv reuses this
interpreter's CPU torch (a ``.pth`` file appends torch's site directory, so the venv's own packages
shadow the rest) and installs ``ps3-torch`` without dependencies plus the versions it needs. timm
imports torchvision, whose compiled ops do not load next to this CPU torch: its shared libraries are
removed and its meta registrations (of those very ops) emptied, so its pure-Python parts import; the
ViT and ConvNeXt code paths compared never call a torchvision op.

Location: ``$SCALEFORGE_PS3_PEER_VENV`` or ``~/.cache/scaleforge/ps3-torch-0.1.3``.
Build by hand: ``python tests/models/ps3_peer/env.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ["ps3-torch==0.1.3", "transformers==4.49.0", "timm==1.0.15", "torchvision==0.29.1", "einops", "safetensors",
            "huggingface_hub<1.0", "tokenizers<0.22", "accelerate<1.5", "ftfy", "wcwidth", "tiktoken"]


def venv_dir() -> Path:
    return Path(os.environ.get("SCALEFORGE_PS3_PEER_VENV",
                               Path.home() / ".cache" / "scaleforge" / "ps3-torch-0.1.3"))


def python() -> Path:
    return venv_dir() / "bin" / "python"


def ensure() -> Path:
    """The venv's python, building the venv first when it is missing or incomplete."""
    d = venv_dir()
    marker = d / ".complete"
    if marker.exists():
        return python()
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(d)], check=True)
    site = next((d / "lib").glob("python*/site-packages"))
    torch_site = Path(torch.__file__).resolve().parent.parent
    (site / "zz_torch_site.pth").write_text(f"import site; site.addsitedir({str(torch_site)!r})\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python()), "install", "-q",
           "--no-warn-conflicts", "--target", str(site)]
    subprocess.run(pip + ["--no-deps", PACKAGES[0]], check=True)
    subprocess.run(pip + PACKAGES[1:] + ["--no-deps"], check=True)
    subprocess.run(pip + ["regex", "pyyaml", "packaging", "filelock", "requests", "tqdm", "numpy<2.3",
                          "fsspec", "typing_extensions", "--no-deps", "--upgrade"], check=True)
    tv = site / "torchvision"
    for so in tv.glob("*.so"):
        so.unlink()
    (tv / "_meta_registrations.py").write_text('"""Emptied: the compiled ops it registers are absent."""\n')
    marker.write_text(" ".join(PACKAGES) + "\n")
    return python()


if __name__ == "__main__":
    print(ensure())
