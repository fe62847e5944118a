import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from training.text_embeddings import EmbeddingStore, load_text_encoder, main, read_captions
from tolerance import ELEMENTWISE, assert_close, assert_differs

MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


def write_tokenizer(folder):
    """A tiny CLIP BPE tokenizer in SD2.1's file layout: printable ASCII, a few merges."""
    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return len(vocab)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp("base")
    vocab_size = write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=32, pad_token_id=0, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1)
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    return root


CAPTIONS = ["a cat on a mat", "a dog", "two cats and a dog in the park", "sky", "a red car"]


@pytest.fixture
def captions(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "imgs" / name)
    lines = [{"image": f"imgs/{'ab'[i % 2]}.png", "box": [i, 0, 20 + i, 16], "caption": c}
             for i, c in enumerate(CAPTIONS)]
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_build_store_and_read_back(base, captions, tmp_path):
    out = tmp_path / "store"
    res = run("--captions", captions, "--base", base, "--out", out, "--batch", 2,
              "--shard-size", 3, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("embeddings-*")) == [
        "embeddings-00000.safetensors", "embeddings-00001.safetensors"]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(e["shard"][-17:-12], e["row"]) for e in index] == [
        ("00000", 0), ("00000", 1), ("00000", 2), ("00001", 0), ("00001", 1)]
    assert [e["caption"] for e in index] == CAPTIONS
    meta = json.loads((out / "store.json").read_text())
    assert meta["count"] == 5 and meta["dim"] == 32 and meta["tokens"] == 77

    store = EmbeddingStore(out)
    assert len(store) == 5
    tokenizer, encoder = load_text_encoder(base)
    for i, text in enumerate(CAPTIONS):
        image, box, emb = store[i]
        assert image == (captions.parent / "imgs" / f"{'ab'[i % 2]}.png").resolve()
        assert box == (i, 0, 20 + i, 16)
        assert store.meta(i) == (image, box)
        ids = tokenizer([text], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            ref = encoder(ids).last_hidden_state[0]
        assert emb.dtype == torch.float32 and emb.shape == (77, 32)
        assert_close(emb, ref, ELEMENTWISE, dtype="float16")  # stored as float16
    # Different captions really give different embeddings (the encoder is not a constant).
    assert_differs(store[1][2], store[0][2], ELEMENTWISE, dtype="float16")
    with pytest.raises(IndexError):
        store[5]
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers receive a pickled store
    assert torch.equal(clone[4][2], store[4][2])


def test_missing_base_folder(captions, tmp_path):
    out = tmp_path / "store"
    res = run("--captions", captions, "--base", tmp_path / "nope", "--out", out)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "nope" in res.output and "tokenizer/" in res.output
    assert not out.exists()


def test_malformed_line_names_its_number(base, tmp_path, captions):
    text = captions.read_text().splitlines()
    text[2] = '{"image": "imgs/a.png", "box": [0, 0, 5'  # cut-off JSON on line 3
    captions.write_text("\n".join(text))
    res = run("--captions", captions, "--base", base, "--out", tmp_path / "store")
    assert res.exit_code != 0 and f"{captions}:3:" in res.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("record, message", [
    ({"image": "imgs/a.png", "box": [0, 0, 50, 10], "caption": "x"}, "exceeds the 40x30"),
    ({"image": "imgs/zz.png", "box": [0, 0, 5, 5], "caption": "x"}, "not found"),
    ({"image": "imgs/a.png", "box": [5, 0, 5, 5], "caption": "x"}, "must be 4 integers"),
    ({"image": "imgs/a.png", "box": [0, 0, 5, 5], "caption": " "}, "caption"),
    ({"image": "imgs/a.png", "caption": "x"}, "keys image, box, caption"),
])
def test_invalid_records(captions, record, message):
    captions.write_text(captions.read_text() + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        read_captions(captions)
    assert f"{captions}:7:" in str(e.value)  # 5 captions, a blank line, then this one


def test_refuses_existing_store_and_bad_store(base, captions, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("--captions", captions, "--base", base, "--out", out)
    assert res.exit_code != 0 and "not an empty folder" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="index.jsonl"):
        EmbeddingStore(out)
