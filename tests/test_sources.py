"""Named model sources: a GGUF split over several wheels is joined in order; the demonstration pair is merged exactly."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from surgery import demo, gguf_import
from surgery.errors import SurgeryError


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """Two importable packages holding the halves of a file, registered as a named wheel model."""
    site = tmp_path / "site"
    payload = b"GGUF" + bytes(range(256)) * 50
    halves = (payload[:3001], payload[3001:])
    for i, half in enumerate(halves, 1):
        pkg = site / f"fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part0{i}.bin").write_bytes(half)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(
        gguf_import.WHEEL_MODELS,
        "fake",
        (
            [(f"fake_part{i}", f"data/part0{i}.bin") for i in (1, 2)],
            "pip install fake-part1 fake-part2",
            "a fake model",
        ),
    )
    return payload


def test_split_wheel_model_is_joined_in_order(fake_wheels, tmp_path):
    path = gguf_import.locate_gguf("fake", tmp_path)
    assert path.read_bytes() == fake_wheels


def test_missing_wheel_names_the_install_command(fake_wheels, monkeypatch, tmp_path):
    monkeypatch.setitem(
        gguf_import.WHEEL_MODELS,
        "fake",
        (
            [("fake_part1", "data/part01.bin"), ("no_such_part", "x.bin")],
            "pip install fake-part1 fake-part2",
            "a fake model",
        ),
    )
    sys.modules.pop("no_such_part", None)
    with pytest.raises(SurgeryError, match="pip install fake-part1 fake-part2"):
        gguf_import.locate_gguf("fake", tmp_path)


def test_every_named_source_has_parts_and_an_install_command():
    assert {"smollm2", "qwen2.5-coder-0.5b", "gemma3-270m"} <= set(gguf_import.WHEEL_MODELS)
    for parts, install, what in gguf_import.WHEEL_MODELS.values():
        assert parts and install.startswith("pip install") and what
    assert len(gguf_import.WHEEL_MODELS["qwen2.5-coder-0.5b"][0]) == 6


def test_merge_adapter_adds_the_scaled_low_rank_update(tmp_path, make_ckpt):
    from peft import LoraConfig, get_peft_model

    from surgery.testing.tiny import tiny_llama

    model_dir = make_ckpt("model")
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    demo.write_fixture(tmp_path / "adapter", tmp_path / "fixture")
    out = demo.merge_adapter(model_dir, tmp_path / "fixture", tmp_path / "merged")
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    adapter = load_file(str(tmp_path / "fixture" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in adapter.values())
    changed = 0
    for name, w in before.items():
        key = name.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{key}.lora_A.weight")
        if a is None:
            assert torch.equal(after[name], w), name
            continue
        b = adapter[f"base_model.model.{key}.lora_B.weight"]
        expected = w + (4 / 2) * (b.float() @ a.float())
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
        assert not torch.equal(after[name], w)
        changed += 1
    assert changed == 4  # q_proj and down_proj of both layers
    assert json.loads((tmp_path / "fixture" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert (out / "tokenizer.json").exists()


def test_demo_refuses_an_existing_output(tmp_path):
    (tmp_path / "demo").mkdir()
    with pytest.raises(SurgeryError, match="already exists"):
        demo.build_demo(tmp_path / "demo")
