"""LoRA: a wrapped model starts equal to its base, only A and B train (with exact gradients),
merging is exact both ways, adapters round-trip through files (ours and PEFT's), misfits are
one-line errors, and `merge-lora` writes a plain checkpoint."""

import json

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import Tensor, backend, hf, lora
from tinygrad_llm import functional as F
from tinygrad_llm.gradcheck import check_gradients
from tinygrad_llm.loading import load_model, save_model
from tinygrad_llm.lora import apply_lora
from tinygrad_llm.models.gpt import GPT, GPTConfig, preset
from tinygrad_llm.nn import Linear
from tinygrad_llm.optim import AdamW
from tinygrad_llm.tokenizer import GPT2Tokenizer

CONFIG = GPTConfig(vocab_size=50257, context_length=16, n_layer=2, n_head=2, n_embd=8,
                   tie_weights=False)
IDS = np.array([[15496, 11, 995, 50256, 0], [464, 2068, 7586, 21831, 18045]])
DEFAULT_NAMES = [f"h.{i}.{layer}" for i in range(2)
                 for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def tiny_gpt(config=CONFIG, seed=0) -> GPT:
    backend.manual_seed(seed)
    return GPT(config)


def train_lora(model, steps=5, lr=1e-2):
    """A few AdamW steps on the trainable parameters (A and B), so B is no longer zero."""
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    targets = np.roll(IDS, -1, axis=1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(IDS, targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.numpy()))
    return losses


@pytest.fixture
def device():
    """The device of the ``trained`` model: the CPU, unless a test parametrizes ``device``."""
    return "cpu"


@pytest.fixture
def trained(device):
    """A tiny GPT with rank-4 LoRA on the default layers, trained a little (on ``device``)."""
    model = tiny_gpt().to(device)
    lora.apply_lora(model, rank=4, alpha=8)
    train_lora(model)
    return model


# ------------------------------------------------------------------------ the layer itself
@pytest.mark.parametrize("device", DEVICES)
def test_a_wrapped_model_starts_equal_to_its_base_and_keeps_the_head_plain(device):
    model = tiny_gpt().to(device)
    before = model(IDS).numpy()
    names = lora.apply_lora(model)
    assert names == DEFAULT_NAMES  # attention and MLP projections of every block, in order
    assert isinstance(model.lm_head, Linear)  # not a default target
    for layer in lora.lora_layers(model).values():
        assert not layer.lora_B.numpy().any()  # B = 0, so B A x = 0
    np.testing.assert_array_equal(model(IDS).numpy(), before)


@pytest.mark.parametrize("device", DEVICES)
def test_a_is_kaiming_uniform_as_in_peft_and_the_scale_is_alpha_over_rank(device):
    backend.manual_seed(0)
    layer = lora.LoRALinear(Linear(400, 300).to(device), rank=64, alpha=32)
    assert layer.lora_A.device == layer.lora_B.device == device  # made on the base's device
    a = layer.lora_A.numpy()
    bound = 1 / np.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on PyTorch's (r, in) weight
    assert a.shape == (400, 64) and layer.lora_B.shape == (64, 300)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound  # the std of U(-b, b) is b / sqrt(3)
    assert layer.scale == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_the_layer_computes_base_plus_scaled_low_rank_update(device):
    backend.manual_seed(1)
    layer = lora.LoRALinear(Linear(6, 5).to(device), rank=3, alpha=6)
    b = backend.generator("cpu").standard_normal((3, 5)).astype(np.float32)
    layer.lora_B.data = backend.to_device(b, device)
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    w, b = layer.base.weight.numpy(), layer.base.bias.numpy()
    a, bb = layer.lora_A.numpy(), layer.lora_B.numpy()
    expected = x @ w + b + (x @ a @ bb) * (6 / 3)
    np.testing.assert_allclose(layer(Tensor(x, device=device)).numpy(), expected, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_acts_on_the_lora_path_only_and_only_while_training(device):
    backend.manual_seed(2)
    layer = lora.LoRALinear(Linear(32, 16).to(device), rank=4, alpha=4, dropout=0.5)
    x = Tensor(np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32),
               device=device)
    base = layer.base(x).numpy()
    np.testing.assert_array_equal(layer(x).numpy(), base)  # B = 0: dropout cannot touch the base
    layer.lora_B.data = backend.array_module(device).ones((4, 16), np.float32)
    first, second = layer(x).numpy(), layer(x).numpy()
    assert not np.allclose(first, second)  # a new mask per call while training
    layer.eval()
    no_dropout = lora.LoRALinear(Linear(32, 16).to(device), rank=4, alpha=4)
    no_dropout.base, no_dropout.lora_A, no_dropout.lora_B = layer.base, layer.lora_A, layer.lora_B
    np.testing.assert_array_equal(layer(x).numpy(), no_dropout(x).numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_only_a_and_b_and_the_base_stays_unchanged(device):
    model = tiny_gpt().to(device)
    lora.apply_lora(model, rank=4, alpha=8)
    frozen = {name: p.numpy().copy() for name, p in model.named_parameters()
              if not name.endswith(("lora_A", "lora_B"))}
    model.loss(IDS, np.roll(IDS, -1, axis=1)).backward()
    for name, parameter in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    losses = train_lora(model)
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if name in frozen:
            np.testing.assert_array_equal(parameter.numpy(), frozen[name])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_gradients_match_finite_differences(device):
    rng = np.random.default_rng(0)
    layer = lora.LoRALinear(Linear(5, 4).to(device), rank=2, alpha=3)
    # float64 for finite differences
    layer.base.weight.data = backend.to_device(rng.standard_normal((5, 4)), device)
    layer.base.bias.data = backend.to_device(rng.standard_normal(4), device)

    def fn(x, a, b):
        layer.lora_A, layer.lora_B = a, b
        return layer(x)

    check_gradients(fn, [rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 2)),
                         rng.standard_normal((2, 4))], device)


@pytest.mark.parametrize("device", DEVICES)
def test_model_gradients_of_a_and_b_match_finite_differences(device):
    config = GPTConfig(vocab_size=11, context_length=4, n_layer=1, n_head=2, n_embd=4,
                       tie_weights=False)
    model = tiny_gpt(config).to(device, dtype=np.float64)
    lora.apply_lora(model, rank=2, alpha=4)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    rng = np.random.default_rng(0)
    for layer in lora.lora_layers(model).values():
        # nonzero: A gets gradient
        layer.lora_B.data = backend.to_device(rng.standard_normal(layer.lora_B.shape), device)
    for layer in (model.h[0].attn.c_attn, model.h[0].mlp.c_proj):
        def fn(a, b, layer=layer):
            layer.lora_A, layer.lora_B = a, b
            return model(ids)

        check_gradients(fn, [layer.lora_A.numpy(), layer.lora_B.numpy()], device)


# parameter counting on a 384-wide model: host bookkeeping, and slow under the stand-in: CPU only
def test_rank_16_on_a_small_gpt_trains_well_under_10_percent_of_the_parameters():
    model = GPT(preset("mini", vocab_size=1000))  # GPT-2-shaped blocks, 384 wide
    total = model.num_params()
    names = lora.apply_lora(model, rank=16, alpha=32)
    c = model.config.n_embd
    per_block = 16 * ((c + 3 * c) + (c + c) + (c + 4 * c) + (4 * c + c))  # r (in + out) each
    assert len(names) == 4 * model.config.n_layer
    trainable = model.num_params(trainable_only=True)
    assert trainable == model.config.n_layer * per_block == 589_824
    assert model.num_params() == total + trainable  # the base is all still there, frozen
    assert trainable / total < 0.06
    optimizer = AdamW(model.parameters(), lr=1e-3)
    assert sum(p.size for p in optimizer.params) == trainable  # optimizer state for A, B only


# --------------------------------------------------------------------------- choosing layers
# (choosing layers by name is host logic: CPU only)
def test_targets_match_full_names_trailing_components_and_globs():
    cases = {("attn.c_proj",): ["h.0.attn.c_proj", "h.1.attn.c_proj"],
             ("h.1.mlp.c_fc",): ["h.1.mlp.c_fc"],
             ("h.0.*", "lm_head"): ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc",
                                    "h.0.mlp.c_proj", "lm_head"]}
    for targets, expected in cases.items():
        assert lora.apply_lora(tiny_gpt(), targets=targets) == expected


def test_a_target_that_matches_nothing_names_the_patterns_and_the_layers():
    model = tiny_gpt()
    with pytest.raises(ValueError) as error:
        lora.apply_lora(model, targets=("c_attn", "q_proj"))
    message = str(error.value)
    assert "'q_proj'" in message and "h.N.attn.c_attn" in message and "lm_head" in message
    assert "\n" not in message and len(message) < 400
    assert not lora.lora_layers(model)  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_bad_settings_and_a_second_apply_are_errors():
    model = tiny_gpt()
    for kwargs in ({"rank": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"targets": ()}):
        with pytest.raises(ValueError):
            lora.apply_lora(model, **kwargs)
    lora.apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model)


# ----------------------------------------------------------------------------- merging
@pytest.mark.parametrize("device", DEVICES)
def test_merged_and_unmerged_give_the_same_logits_both_ways(trained, device):
    assert trained.device == device
    lora_logits = trained(IDS).numpy()
    base_weight = trained.h[0].attn.c_attn.base.weight.numpy().copy()
    layer = trained.h[0].attn.c_attn
    assert np.abs(layer.lora_B.numpy()).max() > 1e-3  # training moved B away from zero
    lora.merge_lora(trained)
    merged_weight = layer.base.weight.numpy()
    np.testing.assert_allclose(merged_weight, base_weight + layer.lora_A.numpy()
                               @ layer.lora_B.numpy() * layer.scale, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(trained(IDS).numpy(), lora_logits, rtol=1e-5, atol=1e-5)
    lora.merge_lora(trained)  # merging twice changes nothing
    np.testing.assert_array_equal(layer.base.weight.numpy(), merged_weight)
    lora.unmerge_lora(trained)
    np.testing.assert_allclose(layer.base.weight.numpy(), base_weight, atol=1e-7)
    np.testing.assert_allclose(trained(IDS).numpy(), lora_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_merged_model_is_a_plain_gpt_that_saves_and_loads(trained, tmp_path, device):
    logits = trained(IDS).numpy()
    plain = lora.merged_model(trained)
    assert not lora.lora_layers(plain) and lora.lora_layers(trained)  # the original keeps LoRA
    assert all(p.requires_grad for p in plain.parameters())
    assert set(plain.state_dict()) == set(tiny_gpt().state_dict())
    np.testing.assert_allclose(plain(IDS).numpy(), logits, rtol=1e-5, atol=1e-5)
    save_model(tmp_path / "merged", plain, GPT2Tokenizer())
    loaded, _, _ = load_model(tmp_path / "merged", device)
    np.testing.assert_allclose(loaded(IDS).numpy(), logits, rtol=1e-5, atol=1e-5)
    lora.remove_lora(trained)  # in place
    assert isinstance(trained.h[0].attn.c_attn, Linear) and not hasattr(trained, "lora_config")


# -------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("device", DEVICES)
def test_save_and_load_adapter_round_trip(trained, tmp_path, device):
    folder = lora.save_adapter(tmp_path / "adapter", trained, base="some/base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors",
                                                       "adapter_config.json"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 8 and config["dropout"] == 0.0
    assert config["targets"] == ["c_attn", "c_proj", "c_fc"] and config["base"] == "some/base"
    assert config["wrapped"] == DEFAULT_NAMES

    fresh = tiny_gpt().to(device)
    assert lora.load_adapter(folder, fresh) == DEFAULT_NAMES
    assert all(p.device == device for p in fresh.parameters())  # A and B on the model's device
    saved = lora.lora_state_dict(trained)
    assert sorted(saved) == sorted(f"{n}.lora_{w}" for n in DEFAULT_NAMES for w in "AB")
    for name, array in lora.lora_state_dict(fresh).items():
        np.testing.assert_array_equal(array, saved[name])
    np.testing.assert_array_equal(fresh(IDS).numpy(), trained(IDS).numpy())
    assert fresh.lora_config.base == "some/base"
    assert fresh.num_params(trainable_only=True) == trained.num_params(trainable_only=True)


# misfit and damaged adapters: errors found on the host before any weight moves, CPU only
def test_an_adapter_of_another_shape_is_a_one_line_error_naming_the_tensor(trained, tmp_path):
    lora.save_adapter(tmp_path / "adapter", trained)
    wider = tiny_gpt(GPTConfig(vocab_size=50257, context_length=16, n_layer=2, n_head=2,
                               n_embd=16, tie_weights=False))
    with pytest.raises(ValueError) as error:
        lora.load_adapter(tmp_path / "adapter", wider)
    message = str(error.value)
    assert "h.0.attn.c_attn.lora_A has shape (8, 4) but this model needs (16, 4)" in message
    assert "\n" not in message and len(message) < 400
    assert not lora.lora_layers(wider)  # the model is untouched

    shallower = tiny_gpt(GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2,
                                   n_embd=8, tie_weights=False))
    with pytest.raises(ValueError) as error:
        lora.load_adapter(tmp_path / "adapter", shallower)
    message = str(error.value)
    assert "does not have (h.1.attn.c_attn, h.1.attn.c_proj, h.1.mlp.c_fc and 1 more" in message
    assert "\n" not in message and len(message) < 400 and not lora.lora_layers(shallower)


def test_missing_and_corrupt_adapters_are_clear_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.load_adapter(tmp_path / "nowhere", tiny_gpt())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
        lora.load_adapter(tmp_path / "empty", tiny_gpt())
    folder = lora.save_adapter(tmp_path / "adapter", trained)
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        lora.load_adapter(folder, tiny_gpt())
    lora.save_adapter(folder, trained)
    (folder / "adapter_config.json").write_text('{"rank": "four"}')
    with pytest.raises(ValueError, match="'rank' is 'four'"):
        lora.load_adapter(folder, tiny_gpt())
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.save_adapter(tmp_path / "x", tiny_gpt())


# ---------------------------------------------------------------------- Hugging Face PEFT
@pytest.mark.parametrize("device", DEVICES)
def test_a_peft_export_loads_with_peft_and_gives_the_same_logits(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tmp_path / "base"
    hf.save_gpt2(tiny_gpt(), base)  # LoRA never changes the base: the same seed gives it
    lora.export_peft(tmp_path / "peft", trained, base=str(base))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "c_proj", "c_fc"]

    model = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    model = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, trained(IDS).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_peft_adapter_loads_here_and_gives_the_same_logits(tmp_path, device):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf.save_gpt2(tiny_gpt(), tmp_path / "base")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                               fan_in_fan_out=True, init_lora_weights=False)  # random B
    model = peft.get_peft_model(model, settings).eval()
    model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDS)).logits.numpy()

    ours, _, _ = load_model(tmp_path / "base", device)
    names = lora.load_adapter(tmp_path / "peft", ours)
    assert names == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    assert ours.lora_config.rank == 4 and ours.lora_config.alpha == 8
    np.testing.assert_allclose(ours(IDS).numpy(), theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ merge-lora command
# merge-lora itself runs on the CPU (it has no --device); the adapter is trained on each device
@pytest.mark.parametrize("device", DEVICES)
def test_merge_lora_command_writes_a_plain_checkpoint(trained, tmp_path, capsys):
    from tinygrad_llm.train.cli import main

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    save_model(base, tiny_gpt(), GPT2Tokenizer())  # the base `trained` started from
    lora.save_adapter(adapter, trained, base=str(base))
    args = ["merge-lora", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    merged, tokenizer, checkpoint = load_model(out)
    assert not lora.lora_layers(merged) and tokenizer.name == "gpt2"
    assert checkpoint["config"]["merged_lora"]["rank"] == 4
    np.testing.assert_allclose(merged(IDS).numpy(), trained(IDS).numpy(), rtol=1e-5, atol=1e-5)

    assert main(args) == 2  # an earlier merge is kept unless --overwrite
    assert "already holds" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(args[:-1] + [str(base)]) == 2  # --out is the base
    assert "would destroy it" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert main(args[:-1] + [str(tmp_path / "other")]) == 2
    assert "other files" in capsys.readouterr().err


# a misfit is refused on the host before merging: CPU only
def test_merge_lora_command_refuses_a_misfit_in_one_line(trained, tmp_path, capsys):
    from tinygrad_llm.train.cli import main

    lora.save_adapter(tmp_path / "adapter", trained)
    wider = tiny_gpt(GPTConfig(vocab_size=50257, context_length=16, n_layer=2, n_head=2,
                               n_embd=16))
    hf.save_gpt2(wider, tmp_path / "wider")  # a Hugging Face folder as the base
    assert main(["merge-lora", "--base", str(tmp_path / "wider"), "--adapter",
                 str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400
    assert "h.0.attn.c_attn.lora_A has shape (8, 4)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_a_lora_wrapped_lm_head_trains_through_the_models_loss(device):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=8,
                          tie_weights=False)).to(device)
    ids = np.array([[1, 2, 3, 4]])
    targets = np.array([[2, 3, 4, 5]])
    expected = F.cross_entropy(model(ids), targets).item()
    apply_lora(model, rank=2, alpha=4, targets=("lm_head",))
    loss = model.loss(ids, targets)  # the fused head cannot see the LoRA path: unfused here
    assert abs(loss.item() - expected) < 1e-6  # B = 0: the same loss as the base
    loss.backward()
    grad = model.lm_head.lora_B.grad
    assert grad is not None and np.abs(backend.to_numpy(grad)).sum() > 0
