"""RecBole's distributed mode on CPU: 2 gloo processes, each with its own 4-bit backbone, train iLoRA like 1 process.

With the whole training split in one batch (RecBole gives each process half of it), the 2-process gradient, the
average of the two halves' mean gradients, equals the 1-process full-batch gradient, so the runs must agree.
"""

import shutil
import socket

import pytest
import torch
from conftest import DATA_DIR, TINY, tiny_config
from recbole.data import create_dataset, data_preparation

from recbole_ilora import _compat
from recbole_ilora.model import iLoRA
from recbole_ilora.quick_start import objective_function, run
from recbole_ilora.trainer import LLMRecTrainer

# SGD: its steps are proportional to the gradients, so float noise stays noise (Adam's first steps are +-lr whatever
# a gradient's size, which turns summation-order noise in near-zero gradients into lr-sized differences).
FULL_BATCH = {"train_batch_size": 4096, "epochs": 3, "learner": "sgd", "learning_rate": 0.5, "topk": [10, 200]}


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_process_group():
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://localhost:{free_port()}")
    yield
    torch.distributed.destroy_process_group()


def test_recboles_ddp_wrapping_works_for_cpu_modules_and_syncs_only_trained_parameters(
    one_process_group, sasrec_checkpoint, llm_cache
):
    from torch.nn.parallel import DistributedDataParallel

    _compat.apply()
    from recbole.trainer import trainer as recbole_trainer

    with pytest.raises(ValueError, match="device_ids"):  # what RecBole's AbstractTrainer does, without the shim
        DistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[0])
    wrapped = recbole_trainer.DistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[0])
    assert isinstance(wrapped, DistributedDataParallel)

    config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    train_data, *_ = data_preparation(config, create_dataset(config))
    model = iLoRA(config, train_data._dataset)
    config["single_spec"], config["world_size"] = False, 1
    trainer = LLMRecTrainer(config, model)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    synchronised = {name for name, _ in model.named_parameters()} - trainer.distributed_model.parameters_to_ignore
    assert synchronised == trained and len(trained) < len(list(model.named_parameters()))
    assert trainer.sync_grad_loss().item() == 0


def even_split_data(tmp_path):
    """lastfm-tiny without the last interaction of one or two users, chosen so that every count that 2 processes
    split is even: the training sequences, the training windows an every-position model trains on, and the test users
    (an odd count makes RecBole's DistributedSampler repeat one sequence, a small but real change of the gradient)."""
    import itertools

    from recbole_ilora.data import training_windows

    data = tmp_path / "data" / "lastfm-tiny"
    shutil.copytree(DATA_DIR / "lastfm-tiny", data)
    inter = data / "lastfm-tiny.inter"
    lines = inter.read_text(encoding="utf-8").splitlines(keepends=True)
    last_line = {line.split("\t")[0]: index for index, line in enumerate(lines[1:], start=1)}  # in time order
    candidates = list(last_line.values())[-12:]
    for dropped in itertools.chain(itertools.combinations(candidates, 1), itertools.combinations(candidates, 2)):
        inter.write_text("".join(line for index, line in enumerate(lines) if index not in dropped), encoding="utf-8")
        config = tiny_config(data_path=str(tmp_path / "data"))
        train_data, _, test_data = data_preparation(config, create_dataset(config))
        counts = (len(train_data._dataset), len(training_windows(config, train_data._dataset)), len(test_data._dataset))
        if all(count % 2 == 0 for count in counts):
            return str(tmp_path / "data")
    raise AssertionError("no even split by dropping one or two users' last interactions")


def test_two_gloo_processes_match_one_process(sasrec_checkpoint, llm_cache, tmp_path):
    model = "iLoRA"
    config = {**TINY, **FULL_BATCH, "model": model, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    config["data_path"] = even_split_data(tmp_path)
    config["score_head"] = "plain"  # the residual head starts at zero: lora_B would get its first gradient at step 2
    single = objective_function(config_dict={**config, "checkpoint_dir": "saved-single"})
    double = run(
        model=model,
        dataset=TINY["dataset"],
        # A new backbone cache: the processes build the (identical, content-addressed) embedded LLaMA themselves.
        config_dict={**config, "checkpoint_dir": "saved-double", "dist_backend": "gloo", "llm_cache_dir": "llm-double"},
        nproc=2,
        port=str(free_port()),
    )
    assert double is not None and double["test_result"].keys() == single["test_result"].keys()
    assert single["test_result"]["hit@200"] > 0 and single["best_valid_result"]["hit@200"] > 0  # not all zeros
    for key, value in single["test_result"].items():
        assert abs(double["test_result"][key] - value) <= 1e-3, (key, double["test_result"][key], value)
    assert double["best_valid_result"] == pytest.approx(single["best_valid_result"], abs=1e-3)
    assert double["trainable_parameters"] == single["trainable_parameters"]
    # The best checkpoint, written once by the first process: the same epoch and the same trained weights.
    one, two = (torch.load(r["saved_model_file"], weights_only=True) for r in (single, double))
    assert one["epoch"] == two["epoch"] and one["state_dict"].keys() == two["state_dict"].keys()
    lora_b = [name for name in one["state_dict"] if ".lora_B." in name]
    assert lora_b and max(one["state_dict"][name].abs().max() for name in lora_b) > 1e-3  # trained away from 0
    for name, weight in one["state_dict"].items():
        torch.testing.assert_close(
            two["state_dict"][name], weight, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
