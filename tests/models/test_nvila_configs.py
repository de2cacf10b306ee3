"""The five NVILA-8B stage configs and the dry-run plan (meta-device model, no memory)."""
from pathlib import Path

import pytest

from scaleforge.models import recipe_config_class
from scaleforge.models.nvila.recipe import NVILARecipe
from scaleforge.platform.config import ConfigError, derive_layout, load_config
from scaleforge.platform.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
STAGES = {  # config -> (trainable, lr, global batch, accumulation at 128 GPUs, max length, starts from)
    "nvila_8b_stage1_align.yaml": ({"mm_projector"}, 1e-3, 512, 1, 8192, None),
    "nvila_8b_stage2_vep.yaml": ({"vision_tower", "mm_projector"}, 2e-5, 1024, 2, 8192, "stage1_align"),
    "nvila_8b_stage3_llm_pretrain.yaml": ({"mm_projector", "llm"}, 2e-5, 1024, 2, 8192, "stage2_vep"),
    "nvila_8b_stage4_image_sft.yaml": ({"vision_tower", "mm_projector", "llm"}, 1.5e-5, 1024, 4, 8192,
                                       "stage3_llm_pretrain"),
    "nvila_8b_stage5_video_sft.yaml": ({"vision_tower", "mm_projector", "llm"}, 2e-5, 2048, 8, 16384,
                                       "stage4_image_sft"),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_configs(name):
    trainable, lr, gbs, ga, max_len, prev = STAGES[name]
    cfg = load_config(ROOT / "configs" / name, [], recipe_config=recipe_config_class)
    assert set(cfg.model.trainable) == trainable
    assert cfg.optim.lr == pytest.approx(lr) and cfg.trainer.global_batch_size == gbs
    assert cfg.model.max_length == max_len
    layout = derive_layout(cfg, 128)
    assert layout.grad_accum == ga
    if prev is None:
        assert cfg.model.init_from_run is None
    else:
        assert cfg.model.init_from_run.endswith(f"nvila_8b_{prev}")
    plan = make_plan(cfg, layout, NVILARecipe(cfg.model, cfg))
    for comp, (n, t) in plan.components.items():
        if comp in trainable:
            assert t > 0.9 * n, comp
        else:
            assert t == 0, comp  # frozen: not counted as trainable, no grads/optimizer memory
    assert plan.memory["optimizer (adamw)"] * 2**30 == pytest.approx(8 * plan.params_trainable / 128)


def test_nvila_8b_sizes_and_plan_lines():
    cfg = load_config(ROOT / "configs/nvila_8b.yaml", [], recipe_config=recipe_config_class)
    r = NVILARecipe(cfg.model, cfg)
    plan = make_plan(cfg, derive_layout(cfg, 128), r)
    comps = plan.components
    assert 0.40e9 < comps["vision_tower"][0] < 0.43e9      # SigLIP so400m
    assert 7.0e9 < comps["llm"][0] < 7.7e9                 # Qwen2.5-7B
    assert comps["mm_projector"][0] == 13824 * 2 + 13824 * 3584 + 3584 + 3584 * 3584 + 3584
    text = "\n".join(plan.lines())
    assert "2304-3072 visual tokens/image" in text and "tokens / step" in text
    assert r.flops_per_sample(None) > 6 * 7e9 * 3000  # at least 6 N T for the LLM part


def test_bad_model_keys_are_named():
    with pytest.raises(ConfigError, match="model.trainable"):
        NVILARecipe(load_config(ROOT / "configs/nvila_tiny.yaml", ["model.trainable=[vit]"],
                                recipe_config=recipe_config_class).model, None)
    with pytest.raises(ConfigError, match="model.projector"):
        load_config(ROOT / "configs/nvila_tiny.yaml", ["model.projector=mlp3x"],
                    recipe_config=recipe_config_class).model.validate()
    with pytest.raises(ConfigError, match="model.video_frames"):
        load_config(ROOT / "configs/nvila_tiny.yaml", ["model.video_frames=10", "model.temporal_pool=4"],
                    recipe_config=recipe_config_class).model.validate()


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    cfg = load_config(ROOT / "configs/nvila_tiny.yaml", [f"model.tokenizer={tmp_path}/nope"],
                      recipe_config=recipe_config_class)
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        NVILARecipe(cfg.model, cfg).tokenizer
