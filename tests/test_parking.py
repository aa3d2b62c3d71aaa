"""The optimiser's state parked in host memory while negatives are generated: emptied while
parked, back bit for bit afterwards, and a run with parking equal to one without."""

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import fresh_model, read_metrics, small_rft_values, small_run_config
from demoalign import IRFTConfig, train
from demoalign.parking import OptimizerParking, parking_enabled


def _stepped_adamw(model, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12)).to(model.device)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, ids


def _state_snapshot(optimizer):
    return [
        {k: v.clone() for k, v in optimizer.state[p].items()}
        for g in optimizer.param_groups
        for p in g["params"]
    ]


def test_parked_state_is_emptied_and_comes_back_bit_for_bit(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    optimizer, ids = _stepped_adamw(model)
    before = _state_snapshot(optimizer)
    tensors = [id(v) for s in optimizer.state.values() for v in s.values()]
    parking = OptimizerParking()

    parking.park(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        state = optimizer.state[p]
        assert state["exp_avg"].untyped_storage().nbytes() == 0
        assert state["exp_avg_sq"].untyped_storage().nbytes() == 0
        assert state["step"].item() == 3  # scalars stay where they are
    # Adam's two fp32 moments per parameter: twice the weights' bytes.
    assert parking.bytes == 2 * sum(p.numel() * 4 for p in params)

    parking.unpark()
    assert not parking.parked
    assert [id(v) for s in optimizer.state.values() for v in s.values()] == tensors
    for old, p in zip(before, params):
        for key, value in old.items():
            assert torch.equal(optimizer.state[p][key], value), key


def test_state_spanning_host_chunks_comes_back_bit_for_bit(tiny_model_dir, monkeypatch):
    """Host memory is chunked (a power of two each, for the pinned allocator): a storage split
    over several chunks, and storages sharing one, are copied back to the right bytes."""
    from demoalign import parking as parking_module

    monkeypatch.setattr(parking_module, "CHUNK_BYTES", 1000)  # not a multiple of any storage
    model = fresh_model(tiny_model_dir)
    optimizer, _ = _stepped_adamw(model)
    before = _state_snapshot(optimizer)
    parking = OptimizerParking()
    parking.park(optimizer)
    assert parking.host_bytes == -(-parking.bytes // 1000) * 1000
    parking.unpark()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for old, p in zip(before, params):
        for key, value in old.items():
            assert torch.equal(optimizer.state[p][key], value), key


def test_parking_twice_is_refused_and_a_trainer_parks_once_when_blocks_nest(
    tiny_model_dir, tmp_path
):
    """A second park would find empty storages and lose the state (the next step would read
    freed memory); an inference block inside another leaves the parking to the outer one, and
    an error inside a block still brings the state back."""
    from demoalign.runio import MetricsLog
    from demoalign.trainer import Trainer, make_accelerator

    model = fresh_model(tiny_model_dir)
    optimizer, _ = _stepped_adamw(model)
    parking = OptimizerParking()
    parking.park(optimizer)
    with pytest.raises(RuntimeError, match="parked already"):
        parking.park(optimizer)
    parking.unpark()

    config = small_run_config(IRFTConfig, tiny_model_dir, tmp_path, park_optimizer_state="on")
    log = MetricsLog(os.devnull, enabled=False)
    trainer = Trainer(config, fresh_model(tiny_model_dir), make_accelerator(config), log)
    trainer.optimizer.load_state_dict(optimizer.state_dict())  # the same shapes: a stepped state
    exp_avg = next(iter(trainer.optimizer.state.values()))["exp_avg"]
    expected = exp_avg.clone()
    with trainer.inference_model():
        with trainer.inference_model():
            assert exp_avg.untyped_storage().nbytes() == 0
        assert exp_avg.untyped_storage().nbytes() == 0, "the inner block unparked"
    assert torch.equal(exp_avg, expected)
    with pytest.raises(ZeroDivisionError):
        with trainer.inference_model():
            1 / 0
    assert torch.equal(exp_avg, expected) and not trainer.parking.parked


def test_training_after_a_park_equals_training_without_one(tiny_model_dir):
    runs = []
    for park in (False, True):
        model = fresh_model(tiny_model_dir)
        optimizer, ids = _stepped_adamw(model)
        if park:
            parking = OptimizerParking()
            for _ in range(2):  # buffers reused on the second park
                parking.park(optimizer)
                parking.unpark()
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_state_on_another_device_than_training_stays_put(tiny_model_dir):
    """State already on the host (FSDP2's CPU offload, while training on a GPU) is not moved."""
    model = fresh_model(tiny_model_dir)
    optimizer, _ = _stepped_adamw(model)
    parking = OptimizerParking("meta")  # the training device is not where this state lives
    parking.park(optimizer)
    assert parking.bytes == 0 and not parking.parked
    assert all(
        v.untyped_storage().nbytes() > 0 for s in optimizer.state.values() for v in s.values()
    )


def test_an_empty_optimiser_parks_nothing(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    parking = OptimizerParking()
    parking.park(optimizer)
    assert parking.bytes == 0 and not parking.parked
    parking.unpark()


@pytest.mark.parametrize(
    "choice, device, deepspeed, parks",
    [
        ("auto", "cuda", False, True),
        ("auto", "cpu", False, False),
        ("auto", "cuda", True, False),
        ("on", "cpu", False, True),
        ("off", "cuda", False, False),
    ],
)
def test_auto_parks_on_a_gpu_unless_deepspeed_owns_the_optimiser(choice, device, deepspeed, parks):
    assert parking_enabled(choice, torch.device(device), deepspeed) is parks


def test_a_bad_choice_is_refused_by_the_config(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="park_optimizer_state='yes': choose one of auto, on, off"):
        small_run_config(IRFTConfig, tiny_model_dir, tmp_path, park_optimizer_state="yes")


def _run(tiny_model_dir, out, **overrides):
    train(small_run_config(IRFTConfig, tiny_model_dir, out, **overrides))
    records = read_metrics(out)
    steps = [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]
    starts = [r for r in records if r.get("event") == "stage_start"]
    return steps, starts, load_file(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_an_irft_run_with_parking_equals_one_without(tiny_model_dir, tmp_path):
    plain_steps, plain_starts, plain_final = _run(
        tiny_model_dir, tmp_path / "off", park_optimizer_state="off"
    )
    steps, starts, final = _run(tiny_model_dir, tmp_path / "on", park_optimizer_state="on")
    assert steps == plain_steps
    assert all(torch.equal(final[k], v) for k, v in plain_final.items())
    n_params = sum(v.numel() for v in final.values() if v.dtype == torch.float32)
    # Stage 1 starts before any step (no state yet); stage 2 parks both AdamW moments.
    assert [r["optimizer_state_parked_bytes"] for r in starts] == [0, 2 * 4 * n_params]
    assert "optimizer_state_parked_bytes" not in plain_starts[1]


def test_a_per_stage_optimiser_is_reset_before_the_negatives_so_nothing_is_parked(
    tiny_model_dir, tmp_path
):
    _, starts, _ = _run(
        tiny_model_dir, tmp_path / "stage", park_optimizer_state="on", optimizer_scope="stage"
    )
    assert [r["optimizer_state_parked_bytes"] for r in starts] == [0, 0]


@pytest.mark.slow
def test_an_rft_run_with_parking_equals_one_without(tiny_model_dir, tmp_path, monkeypatch):
    """RFT's negatives come from the policy trainer's inference model too: its state is parked
    at the second outer iteration and the run is unchanged."""
    from demoalign import RFTConfig
    from demoalign.config import build_config

    parked, real_park = [], OptimizerParking.park

    def recorded_park(self, optimizer):
        real_park(self, optimizer)
        parked.append(self.bytes)

    monkeypatch.setattr(OptimizerParking, "park", recorded_park)
    finals = []
    for park in ("off", "on"):
        out = tmp_path / park
        values = small_rft_values(tiny_model_dir, out, park_optimizer_state=park)
        train(build_config(RFTConfig, values))
        finals.append(load_file(out / "final" / "model.safetensors"))
    assert len(parked) == 2 and parked[0] == 0 and parked[1] > 0
    assert all(torch.equal(finals[1][k], v) for k, v in finals[0].items())


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU")),
]


def _checkpointed_adamw(tiny_model_dir, tmp_path, device):
    """A stepped AdamW's weights and state saved as checkpoint.py saves them; the batch."""
    model = fresh_model(tiny_model_dir).to(device)
    optimizer, ids = _stepped_adamw(model)
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "p.pt"
    )
    return tmp_path / "p.pt", ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mmap", [False, True], ids=["loaded", "memory_mapped"])
def test_a_state_loaded_from_a_checkpoint_file_parks_and_comes_back(
    tiny_model_dir, tmp_path, device, mmap
):
    """An optimiser state loaded as checkpoint.py loads it may view the loaded file's storage,
    which cannot be emptied: parking moves it to storage of its own (same tensor objects, same
    bytes), and the next step is the one an unparked state takes."""
    path, ids = _checkpointed_adamw(tiny_model_dir, tmp_path, device)
    stepped = []
    for park in (False, True):
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        model = fresh_model(tiny_model_dir).to(device)
        model.load_state_dict(saved["model"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizer.load_state_dict(saved["optimizer"])
        if park:
            before = _state_snapshot(optimizer)
            tensors = [id(v) for s in optimizer.state.values() for v in s.values()]
            parking = OptimizerParking(device)
            for _ in range(2):  # the second park finds storage of its own already
                parking.park(optimizer)
                assert parking.bytes == 2 * sum(p.numel() * 4 for p in model.parameters())
                parking.unpark()
            assert [id(v) for s in optimizer.state.values() for v in s.values()] == tensors
            after = _state_snapshot(optimizer)
            assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        stepped.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*stepped))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_with_parking_equals_the_uninterrupted_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Killed inside stage 1 and resumed from its step-3 checkpoint, the run parks the loaded
    optimiser state before stage 2's negatives; it ends as the run that was never stopped."""
    from dataclasses import replace

    from demoalign.runio import read_run_state
    from demoalign.trainer import Trainer

    config = small_run_config(
        IRFTConfig,
        tiny_model_dir,
        tmp_path / "resumed",
        epochs_per_stage=2,
        save_steps=3,
        resume=True,
        park_optimizer_state="on",
    )
    real_step, calls = Trainer.step, []

    def killed_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what a kill looks like from inside
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "step", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(config)
    parked = []
    real_park = OptimizerParking.park

    def recorded_park(self, optimizer):
        real_park(self, optimizer)
        parked.append(self.bytes)

    monkeypatch.setattr(OptimizerParking, "park", recorded_park)
    train(config)
    assert read_run_state(tmp_path / "resumed")["state"] == "finished"
    assert any(parked), "the loaded state was parked"

    plain = replace(config, output_dir=str(tmp_path / "uninterrupted"), resume=False)
    train(plain)
    resumed_final = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    plain_final = load_file(tmp_path / "uninterrupted" / "final" / "model.safetensors")
    assert all(torch.equal(resumed_final[k], v) for k, v in plain_final.items())

    def steps(out):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]

    assert steps(tmp_path / "resumed") == steps(tmp_path / "uninterrupted")
