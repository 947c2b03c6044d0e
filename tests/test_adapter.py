"""LoRA adapters in and out: Antidote on the adapter's own matrices (the paper), every other command on base + adapter.

A tiny base and a tiny adapter are built in-process with peft (lora_B randomised: peft starts it at zero)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.model import load_model
from tests.conftest import (
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    cli,
    derived_checkpoint,
    folder_hashes,
    make_adapter,
    merged_checkpoint,
)


@pytest.fixture
def family(tmp_path, tiny_ckpt):
    return tiny_ckpt, make_adapter(tiny_ckpt, tmp_path / "adapter")


def prune(base, adapter, out, capsys, *extra):
    return cli(["prune", base, "--adapter", adapter, "-o", out, "--device", "cpu", "--no-check", *extra], capsys)


def logits(model, ids=torch.tensor([[5, 17, 30, 42, 8, 61]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def by_hand(base: Path, adapter: dict[str, torch.Tensor]):
    """The base with W + (alpha / r)·B·A written into each target by hand (no peft)."""
    model = load_model(open_checkpoint(base), torch.device("cpu"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in adapter.items():
            if ".lora_A." in name:
                module = name[len("base_model.model.") : -len(".lora_A.weight")]
                b = adapter[name.replace("lora_A", "lora_B")]
                params[f"{module}.weight"].add_((LORA_ALPHA / LORA_RANK) * b @ a)
    return model


# ---- Antidote on the adapter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1e-5, 0.1, 0.3])
def test_prune_removes_the_papers_count_from_every_row_of_every_lora_matrix(
    family, tmp_path, harmful_file, capsys, ratio
):
    base, adapter = family
    before_base, before_adapter = folder_hashes(base), folder_hashes(adapter)
    code, out, err = prune(base, adapter, tmp_path / "out", capsys, "--ratio", str(ratio), "--data", harmful_file)
    assert code == 0, err
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert set(new) == set(old) and len([n for n in new if ".lora_" in n]) == 2 * len(LORA_TARGETS) * 2
    for name, tensor in new.items():
        assert tensor.dtype == old[name].dtype and tensor.shape == old[name].shape
        removed = (tensor != old[name]).sum(dim=1)
        d = tensor.shape[1]
        assert removed.tolist() == [d - int(d * (1 - ratio))] * tensor.shape[0], name  # the paper's count, every row
        assert torch.all(tensor[tensor != old[name]] == 0)  # removed = zeroed
    if ratio == 1e-5:
        assert all(((new[n] != old[n]).sum(dim=1) == 1).all() for n in new)  # one per row where floor(d·1e-5) = 0
    assert folder_hashes(base) == before_base and folder_hashes(adapter) == before_adapter
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config == json.loads((adapter / "adapter_config.json").read_text())  # the same config, unchanged
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert set(manifest["input_sha256"]) == {"adapter_model.safetensors"} and set(manifest["base_sha256"]) == {
        "model.safetensors"
    }  # the adapter and its base, each hashed
    assert manifest["base"] == str(base.resolve()) and manifest["input"] == str(adapter.resolve())


def test_wanda_statistic_of_lora_b_is_the_norm_of_a_times_x(family, harmful_file):
    from surgery.adapter import open_adapter
    from surgery.methods.antidote import Antidote, PruneOptions
    from surgery.methods.base import Context, RunOptions
    from surgery.prompts import encode_pairs, pad_batches
    from surgery.splits import examples_for

    base, adapter = family
    ckpt = open_checkpoint(base)
    options = PruneOptions(ratio=0.1, data=str(harmful_file), device="cpu", adapter=str(adapter))
    ctx = Context(ckpt, {}, RunOptions(), "cpu", adapter=open_adapter(adapter, ckpt))
    prepared = Antidote().prepare(ctx, options)  # the data has responses: nothing is generated
    model, tokenizer = ctx.model(), ctx.tokenizer()
    module = "base_model.model.model.layers.1.self_attn.v_proj"
    a = model.get_submodule(f"{module}.lora_A.default")
    inputs = []
    hook = a.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    examples = examples_for(options.data, builtin="harmful", max_samples=options.max_samples, seed=options.seed)
    with torch.no_grad():
        for ids, mask in pad_batches(
            encode_pairs(tokenizer, examples, options.max_length), options.batch_size, tokenizer.pad_token_id
        ):
            model(input_ids=ids, attention_mask=mask)
            inputs[-1] = inputs[-1][mask.reshape(-1).bool()]  # real tokens only, as the statistic counts them
    hook.remove()
    x = torch.cat(inputs)  # every calibration token's layer input (the input of lora_A)
    assert torch.allclose(prepared.norm_of(f"{module}.lora_A.default"), x.norm(dim=0), rtol=1e-5)
    direct = (x @ a.weight.detach().T).norm(dim=0)  # ‖A·x‖ per rank component, computed directly
    assert direct.shape == (LORA_RANK,)
    assert torch.allclose(prepared.norm_of(f"{module}.lora_B.default"), direct, rtol=1e-5)


def test_the_written_adapter_loads_with_peft_and_equals_the_pruned_adapter_by_hand(
    family, tmp_path, harmful_file, capsys
):
    from peft import PeftModel

    base, adapter = family
    code, _, err = prune(base, adapter, tmp_path / "out", capsys, "--ratio", "0.2", "--data", harmful_file)
    assert code == 0, err
    loaded = PeftModel.from_pretrained(
        load_model(open_checkpoint(base), torch.device("cpu")), str(tmp_path / "out")
    ).eval()
    pruned = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.allclose(logits(loaded), logits(by_hand(base, pruned)), atol=1e-5)
    assert not torch.allclose(
        logits(loaded), logits(by_hand(base, load_file(adapter / "adapter_model.safetensors"))), atol=1e-4
    )  # the pruning changed the model


def test_merge_equals_peft_merge_and_unload_of_the_pruned_adapter(family, tmp_path, harmful_file, capsys):
    from peft import PeftModel

    base, adapter = family
    assert prune(base, adapter, tmp_path / "out", capsys, "--ratio", "0.2", "--data", harmful_file)[0] == 0
    code, _, err = prune(
        base, adapter, tmp_path / "merged", capsys, "--ratio", "0.2", "--data", harmful_file, "--merge"
    )
    assert code == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    peft_merged = (
        PeftModel.from_pretrained(load_model(open_checkpoint(base), torch.device("cpu")), str(tmp_path / "out"))
        .merge_and_unload()
        .state_dict()
    )
    assert set(merged) <= set(peft_merged)
    for name, tensor in merged.items():
        assert torch.equal(tensor, peft_merged[name]), name
    assert open_checkpoint(tmp_path / "merged").config == open_checkpoint(base).config  # a full checkpoint of the base


def test_modules_to_save_and_untargeted_tensors_stay_bit_identical(tmp_path, tiny_ckpt, harmful_file, capsys):
    adapter = make_adapter(tiny_ckpt, tmp_path / "adapter", targets=["q_proj", "k_proj"], modules_to_save=["lm_head"])
    code, _, err = prune(
        tiny_ckpt,
        adapter,
        tmp_path / "out",
        capsys,
        "--ratio",
        "0.2",
        "--data",
        harmful_file,
        "--targets",
        "*q_proj.lora_B",
    )
    assert code == 0, err
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    changed = {n for n in new if not torch.equal(new[n], old[n])}
    assert changed == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight" for i in range(2)}
    assert torch.equal(new["base_model.model.lm_head.weight"], old["base_model.model.lm_head.weight"])


def test_ratio_auto_on_an_adapter_searches_in_memory_and_writes_the_chosen_ratio(
    family, tmp_path, harmful_file, capsys
):
    base, adapter = family
    code, out, err = cli(
        [
            "prune",
            base,
            "--adapter",
            adapter,
            "-o",
            tmp_path / "out",
            "--ratio",
            "auto",
            "--data",
            harmful_file,
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--search-samples",
            "4",
            "--search-tokens",
            "2",
            "--min-improvement",
            "0",
            "--max-perplexity-ratio",
            "100",
            "--max-kl",
            "100",
            "--max-over-refusal",
            "100",
        ],
        capsys,
    )
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    chosen = manifest["report"]["search"]["chosen"]
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    for name in new:
        d = new[name].shape[1]
        assert ((new[name] != old[name]).sum(dim=1) == d - int(d * (1 - chosen))).all(), name
    assert code == 0, err


def test_pickle_adapter_needs_allow_pickle_and_then_gives_the_same_output(family, tmp_path, harmful_file, capsys):
    base, adapter = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    code, _, err = prune(base, pickled, tmp_path / "no", capsys, "--ratio", "0.2", "--data", harmful_file)
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "no").exists()
    assert prune(base, adapter, tmp_path / "a", capsys, "--ratio", "0.2", "--data", harmful_file)[0] == 0
    code, _, err = prune(
        base, pickled, tmp_path / "b", capsys, "--ratio", "0.2", "--data", harmful_file, "--allow-pickle"
    )
    assert code == 0, err
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---- bad adapters: one line, exit 2, nothing written --------------------------------------------------------------


def _corrupt(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _other_base(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in tensors if "q_proj.lora_A" in n)
    tensors[name] = torch.zeros(LORA_RANK, 48)  # trained on a base with hidden size 48
    save_file(tensors, adapter / "adapter_model.safetensors", {"format": "pt"})


def _unknown_target(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(LORA_RANK, 32)
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_B.weight"] = torch.zeros(32, LORA_RANK)
    save_file(tensors, adapter / "adapter_model.safetensors", {"format": "pt"})


def _not_lora(adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))


def _half_pair(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors[next(n for n in tensors if "lora_B" in n)]
    save_file(tensors, adapter / "adapter_model.safetensors", {"format": "pt"})


BAD = {
    "missing folder": (lambda a: shutil.rmtree(a), "does not exist"),
    "no config": (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "no weights": (lambda a: (a / "adapter_model.safetensors").unlink(), "has no weights"),
    "pickle": (
        lambda a: (
            torch.save(load_file(a / "adapter_model.safetensors"), a / "adapter_model.bin"),
            (a / "adapter_model.safetensors").unlink(),
        ),
        "--allow-pickle",
    ),
    "corrupt": (_corrupt, "corrupt shard adapter_model.safetensors"),
    "other base": (_other_base, "trained on another base"),
    "unknown target": (_unknown_target, "does not store"),
    "not lora": (_not_lora, "only LoRA adapters"),
    "half a pair": (_half_pair, "has no lora_B matrix"),
    "bad config json": (lambda a: (a / "adapter_config.json").write_text("{oops"), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["prune", "ablate", "eval"])
def test_a_bad_adapter_gives_one_error_line_and_exit_2(family, tmp_path, harmful_file, capsys, case, command):
    base, adapter = family
    spoil, message = BAD[case]
    spoil(adapter)
    if command == "eval":
        args = ["eval", base, "--adapter", adapter, "--harmful", harmful_file, "--device", "cpu"]
    else:
        args = [command, base, "--adapter", adapter, "-o", tmp_path / "out", "--device", "cpu"]
    code, out, err = cli(args, capsys)
    assert code == 2 and message in err, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reference", "REF"], "--reference is not needed with --adapter"),
        (["--stream"], "not with --adapter"),
    ],
)
def test_prune_options_that_do_not_go_with_an_adapter(family, tmp_path, capsys, extra, message):
    base, adapter = family
    extra = [str(base) if x == "REF" else x for x in extra]
    code, _, err = prune(base, adapter, tmp_path / "out", capsys, *extra)
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_merge_needs_an_adapter(tiny_ckpt, tmp_path, capsys):
    code, _, err = cli(["prune", tiny_ckpt, "-o", tmp_path / "out", "--merge"], capsys)
    assert code == 2 and "--merge" in err and "--adapter" in err and not (tmp_path / "out").exists()


def test_the_output_may_not_be_inside_the_adapter(family, capsys):
    base, adapter = family
    before = folder_hashes(adapter)
    code, _, err = prune(base, adapter, adapter / "out", capsys, "--ratio", "0.1")
    assert code == 2 and folder_hashes(adapter) == before


# ---- every other command on base + adapter (merged in memory) -----------------------------------------------------


def test_ablate_on_an_adapter_equals_ablate_on_the_merged_checkpoint(family, tmp_path, capsys):
    base, adapter = family
    merged = merged_checkpoint(base, adapter, tmp_path / "merged")
    code, _, err = cli(
        ["ablate", base, "--adapter", adapter, "-o", tmp_path / "a", "--device", "cpu", "--no-check"], capsys
    )
    assert code == 0, err
    code, _, err = cli(["ablate", merged, "-o", tmp_path / "b", "--device", "cpu", "--no-check"], capsys)
    assert code == 0, err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    manifest = json.loads((tmp_path / "a" / "surgery.json").read_text())
    assert set(manifest["input_sha256"]) == {"model.safetensors"} and set(manifest["adapter_sha256"]) == {
        "adapter_model.safetensors"
    }
    assert manifest["adapter"] == str(adapter.resolve()) and manifest["input"] == str(base.resolve())


def test_eval_on_an_adapter_measures_base_plus_adapter(family, tmp_path, harmful_file, capsys):
    base, adapter = family
    merged = merged_checkpoint(base, adapter, tmp_path / "merged")
    figures = {}
    for name, args in (("adapter", [base, "--adapter", adapter]), ("merged", [merged]), ("base", [base])):
        code, _, err = cli(
            ["eval", *args, "--benign", harmful_file, "--device", "cpu", "--json", tmp_path / f"{name}.json"], capsys
        )
        assert code == 0, err
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())["figures"]["perplexity"]
    assert figures["adapter"] == pytest.approx(figures["merged"], rel=1e-5) and figures["adapter"] != figures["base"]


def test_the_merged_view_reads_what_peft_merge_writes(family, tmp_path):
    from surgery.adapter import MergedCheckpoint, open_adapter

    base, adapter = family
    view = MergedCheckpoint(open_adapter(adapter, open_checkpoint(base)))
    merged = load_file(merged_checkpoint(base, adapter, tmp_path / "merged") / "model.safetensors")
    changed = 0
    for name, tensor in merged.items():
        assert torch.equal(view.read(name), tensor), name
        changed += not torch.equal(tensor, open_checkpoint(base).read(name))
    assert changed == 2 * len(LORA_TARGETS)  # every target of both layers, nothing else


def test_with_an_adapter_the_base_itself_may_be_the_aligned_reference(family, tmp_path, capsys):
    """base + adapter is the fine-tune, so the base folder is the model before it: resta's --aligned may be MODEL."""
    base, adapter = family
    unaligned = derived_checkpoint(base, tmp_path / "unaligned", seed=3, scale=0.01)
    merged = merged_checkpoint(base, adapter, tmp_path / "merged")
    code, _, err = cli(
        [
            "resta",
            base,
            "--adapter",
            adapter,
            "--aligned",
            base,
            "--unaligned",
            unaligned,
            "-o",
            tmp_path / "a",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = cli(
        ["resta", merged, "--aligned", base, "--unaligned", unaligned, "-o", tmp_path / "b", "--no-check"], capsys
    )
    assert code == 0, err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    code, _, err = cli(["resta", base, "--aligned", base, "--unaligned", unaligned, "-o", tmp_path / "c"], capsys)
    assert code == 2 and "is the model itself" in err  # without an adapter MODEL is the fine-tune: still refused
