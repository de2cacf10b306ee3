"""``model.init_from``: HF weights loaded into an FSDP2-sharded (DTensor) model, two gloo processes.
(Kept apart from test_llm_hf.py so the spawned workers do not import transformers.)"""
from __future__ import annotations

import pytest
import torch

from scaleforge.models.llm import LLMModelConfig, Transformer, from_pretrained, save_pretrained


def _fsdp_load_worker(rank: int, world: int, init_file: str, hf_dir: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from scaleforge.models.llm.recipe import LLMRecipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        recipe = LLMRecipe(LLMModelConfig(preset=None, init_from=hf_dir), None)
        with torch.device("meta"):
            model = recipe.build_model(torch.device("meta"))
        mesh = init_device_mesh("cpu", (world,))
        for unit in recipe.parallel_plan(model).fsdp_units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        recipe.init_weights(model)
        recipe.load_pretrained(model, hf_dir)
        w = model.layers[0].attention.wq.weight
        assert isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // world
        assert model.output.weight is model.tok_embeddings.weight  # tie survives sharding
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, out_file)
        # both ranks tear gloo down together (as the other spawned-worker tests do): a rank that exits
        # while its peer is still busy (here: rank 0 saving) can close the peer's connections under gloo's
        # I/O thread, which aborted rank 0 with "terminate called without an active exception" now and then
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from scaleforge.platform.dist import exit_process

    exit_process(0)  # done: no interpreter finalization, where gloo can abort the process (see exit_process)


@pytest.mark.slow
def test_load_pretrained_into_fsdp2_sharded_model(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(9)
    src = Transformer(LLMModelConfig(preset="tiny", tied_embeddings=True, n_layers=2).resolved())
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0.0, 0.1)
    save_pretrained(src, tmp_path / "hf")
    ctx = mp.get_context("spawn")
    out = tmp_path / "loaded.pt"
    procs = [ctx.Process(target=_fsdp_load_worker,
                         args=(r, 2, str(tmp_path / "init"), str(tmp_path / "hf"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    got = torch.load(out)
    want = from_pretrained(tmp_path / "hf").state_dict()
    assert set(got) == set(want) == set(src.state_dict())
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert torch.equal(got[k], src.state_dict()[k]), k
