"""flashgguf-convert on Hugging Face safetensors checkpoints: tiny seeded checkpoints of each
supported layout against numpy reference forward passes, and bad inputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import rel_err
from hf_factory import TinyHF, to_bf16_bits, write_safetensors, write_tiny_checkpoint
from numpy_reference import hf_llama_logits, hf_opt_logits

from flashgguf import Llama
from flashgguf.convert import ConvertOptions, convert_hf
from flashgguf.convert.cli import main as convert_main
from flashgguf.errors import ConvertError, FlashGGUFError, FormatError, UnsupportedError
from flashgguf.evaluate import teacher_forced_logits, top1_agreement
from flashgguf.format import open_flash_file

TEXT = ("The old man looked at the sea and thought about the long day ahead of him, "
        "the boat, the line and the fish that would come.")
KW = dict(n_ctx=128, n_batch=64, n_ubatch=64, logits_all=True, verbose=False, n_threads=2)
QUIET = ConvertOptions(progress=False, log=lambda _m: None)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tiny_tokenizer_gguf):
    """Factory: TinyHF -> (checkpoint folder, its weights), cached per spec."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[TinyHF, tuple[Path, dict]] = {}

    def make(spec: TinyHF) -> tuple[Path, dict]:
        if spec not in made:
            folder = root / f"{spec.kind}-{len(made)}"
            made[spec] = folder, write_tiny_checkpoint(folder, spec, tiny_tokenizer_gguf)
        return made[spec]

    return make


@pytest.mark.native
@pytest.mark.parametrize("kind,activation", [
    ("relullama", "relu"), ("prosparse", "fatrelu"), ("turbosparse", "drelu"),
    ("qwen2", "silu"), ("opt", "relu"), ("mistral", "silu"),
])
def test_tiny_checkpoint_matches_reference(tiny_hf, tmp_path, kind, activation):
    spec = TinyHF(kind=kind)
    folder, weights = tiny_hf(spec)
    out = tmp_path / "tiny.flash.gguf"
    convert_hf(folder, out, QUIET)
    flash = open_flash_file(out)
    assert flash.activation == activation
    assert flash.arch == {"opt": "gpt2", "qwen2": "qwen2"}.get(kind, "llama")
    if kind == "prosparse":
        assert flash.activation_threshold == pytest.approx(spec.threshold)

    llm = Llama(str(out), flash_offload=True, **KW)
    tokens = llm.tokenize(TEXT.encode(), add_bos=False)[:24]
    got = teacher_forced_logits(llm, tokens)
    # flashgguf's runtime computed every FFN (the hook found this architecture's nodes)
    assert llm.flash_stats()["neurons_computed"] == len(tokens) * spec.n_ff * spec.n_layer
    llm.close()
    forward = hf_opt_logits if kind == "opt" else hf_llama_logits
    want = forward(spec, weights, tokens)
    # trunk in F16, gate/up bundles F16, down columns Q8_0, activations quantized to F16/Q8_0
    print(f"{kind}: relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 0.02, rel_err(got, want)
    assert top1_agreement(got, want) >= 0.9
    if kind in ("prosparse", "turbosparse"):
        # the test can tell the activation apart: plain ReLU would be far off
        wrong = hf_llama_logits(spec, weights, tokens, act_kind="relullama")
        assert rel_err(got, wrong) > 5 * rel_err(got, want)


# ---- bad inputs: a clear FlashGGUFError and nothing left behind ----------------------------


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _corrupt_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00")  # not even the length field


def _header_past_end(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])


def _truncated_data(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _rewrite_header(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    edit(header)
    head = json.dumps(header).encode()
    head += b" " * (hlen - len(head))  # same length: the data offsets stay valid
    assert len(head) == hlen
    path.write_bytes(data[:8] + head + data[8 + hlen:])


def _unreadable_dtype(folder: Path) -> None:
    def edit(header):  # 4 bytes per value either way: an int32 tensor of the same size
        header["model.layers.0.mlp.up_proj.weight"]["dtype"] = "I32"
    _rewrite_header(folder, edit)


def _mismatched_shape(folder: Path) -> None:
    def edit(header):  # same bytes, transposed: config.json implies the other shape
        t = header["model.layers.1.self_attn.o_proj.weight"]
        t["shape"] = t["shape"][::-1]
        u = header["model.layers.0.mlp.down_proj.weight"]
        u["shape"] = u["shape"][::-1]
    _rewrite_header(folder, edit)


def _unknown_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))


def _unknown_pre_tokenizer(folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tok))


# Found by fuzzing (tests/fuzz_flash.py): each was a raw TypeError, AttributeError,
# OverflowError or struct.error before.
def _json_edit(name: str, edit) -> None:
    def damage(folder: Path) -> None:
        doc = json.loads((folder / name).read_text())
        edit(doc)
        (folder / name).write_text(json.dumps(doc))
    damage.__name__ = f"_{name.split('.')[0]}_{edit.__name__.strip('_')}"
    return damage


def _architecture_object(c): c["architectures"] = [{}]  # noqa: E704
def _activation_object(c): c["hidden_act"] = {}  # noqa: E704
def _huge_positions(c): c["max_position_embeddings"] = 1 << 62  # noqa: E704
def _huge_eps(c): c["rms_norm_eps"] = 1e300  # noqa: E704
def _vocab_number(t): t["model"]["vocab"] = 7  # noqa: E704
def _token_id_string(t): t["model"]["vocab"][next(iter(t["model"]["vocab"]))] = "x"  # noqa: E704
def _added_token_number(t): t["added_tokens"] = [3]  # noqa: E704
def _merge_number(t): t["model"]["merges"][0] = 5  # noqa: E704
def _pre_tokenizer_string(t): t["pre_tokenizer"] = "ByteLevel"  # noqa: E704


@pytest.mark.parametrize("damage,error,message", [
    (_json_edit("config.json", _architecture_object), UnsupportedError, "architectures"),
    (_json_edit("config.json", _activation_object), UnsupportedError, "hidden_act"),
    (_json_edit("config.json", _huge_positions), FormatError, "below 2\\^31"),
    (_json_edit("config.json", _huge_eps), FormatError, "float32 number"),
    (_json_edit("tokenizer.json", _vocab_number), FormatError, "model.vocab is int"),
    (_json_edit("tokenizer.json", _token_id_string), FormatError, "the id of token"),
    (_json_edit("tokenizer.json", _added_token_number), FormatError, "an added token is int"),
    (_json_edit("tokenizer.json", _merge_number), FormatError, "merges"),
    (_json_edit("tokenizer.json", _pre_tokenizer_string), FormatError, "pre_tokenizer is str"),
    (_corrupt_header, FormatError, "too short"),
    (_header_past_end, FormatError, "header claims"),
    (_truncated_data, FormatError, "outside the data section"),
    (_missing_config, ConvertError, "config.json is missing"),
    (_unreadable_dtype, UnsupportedError, "dtype I32"),
    (_mismatched_shape, FormatError, "config.json implies"),
    (_unknown_architecture, UnsupportedError, "supported: "),
    (_unknown_pre_tokenizer, UnsupportedError, "pre-tokenizer"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_bad_checkpoint_is_refused(tiny_hf, tmp_path, damage, error, message):
    folder = _copy_checkpoint(tiny_hf(TinyHF(kind="relullama"))[0], tmp_path / "ckpt")
    damage(folder)
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "out.flash.gguf"
    with pytest.raises(error, match=message) as info:
        convert_hf(folder, out, QUIET)
    assert isinstance(info.value, FlashGGUFError)
    assert set(tmp_path.rglob("*")) == before  # no output, no scratch or partial file
    # the command line says the same and fails
    assert convert_main([str(folder), "-o", str(out), "-q"]) == 2
    assert not out.exists()


def test_opt_350m_layout_is_refused(tiny_hf, tmp_path):
    folder = _copy_checkpoint(tiny_hf(TinyHF(kind="opt"))[0], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config.update(do_layer_norm_before=False, word_embed_proj_dim=32)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="opt-350m"):
        convert_hf(folder, tmp_path / "out.flash.gguf", QUIET)
    assert not (tmp_path / "out.flash.gguf").exists()


@pytest.mark.native
def test_sharded_bf16_checkpoint_through_the_cli(tiny_hf, tmp_path):
    """model.safetensors.index.json over two BF16 shards, --outtype q8_0, via the CLI."""
    spec = TinyHF(kind="relullama", seed=3)
    single, weights = tiny_hf(spec)
    folder = tmp_path / "sharded"
    folder.mkdir()
    for f in single.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            (folder / f.name).write_bytes(f.read_bytes())
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        write_safetensors(folder / shard, {n: weights[n] for n in members}, "BF16")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, ms in shards.items() for n in ms}}))
    bf16 = {n: (to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
            for n, w in weights.items()}

    out = tmp_path / "sharded.flash.gguf"
    index = folder / "model.safetensors.index.json"
    assert convert_main([str(index), "-o", str(out), "--outtype", "q8_0", "-q"]) == 0
    assert convert_main([str(index), "-o", str(out), "-q"]) == 2  # refuses to overwrite
    llm = Llama(str(out), flash_offload=True, **KW)
    tokens = llm.tokenize(TEXT.encode(), add_bos=False)[:24]
    got = teacher_forced_logits(llm, tokens)
    llm.close()
    want = hf_llama_logits(spec, bf16, tokens)
    assert rel_err(got, want) < 0.03, rel_err(got, want)
    assert top1_agreement(got, want) >= 0.9


def test_index_naming_a_missing_shard_is_refused(tiny_hf, tmp_path):
    folder = _copy_checkpoint(tiny_hf(TinyHF(kind="relullama"))[0], tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConvertError, match="shard 'model-00002-of-00002.safetensors' is missing"):
        convert_hf(folder, tmp_path / "out.flash.gguf", QUIET)
    assert not (tmp_path / "out.flash.gguf").exists()


def test_fatrelu_payload_without_its_threshold_is_refused(tiny_hf, tmp_path, monkeypatch):
    import flashgguf.format.constants as C

    folder, _ = tiny_hf(TinyHF(kind="prosparse"))
    out = tmp_path / "no-threshold.flash.gguf"
    with monkeypatch.context() as m:  # a converter that forgets to write the threshold
        m.setattr(C, "THRESHOLD_ACTIVATIONS", ())
        convert_hf(folder, out, QUIET)
    with pytest.raises(FormatError, match="activation_threshold"):
        open_flash_file(out)
