"""Reliability: the same seed and configuration give the same metrics; another seed gives others."""

from conftest import TINY

from recbole_ilora.quick_start import objective_function


def run(seed, sasrec_checkpoint, llm_cache):
    config = {**TINY, "model": "iLoRA", "epochs": 1, "seed": seed, "test_modes": ["full", "uni19"]}
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, checkpoint_dir=f"saved-{seed}")
    result = objective_function(config_dict=config)
    return result["best_valid_result"], result["test_results"]


def test_same_seed_same_metrics_other_seed_other_metrics(sasrec_checkpoint, llm_cache):
    first = run(2020, sasrec_checkpoint, llm_cache)
    again = run(2020, sasrec_checkpoint, llm_cache)
    assert first == again  # full ranking and the seeded uni19, exactly
    other = run(7, sasrec_checkpoint, llm_cache)
    assert other[1]["uni19"] != first[1]["uni19"]  # other candidates and another training order
