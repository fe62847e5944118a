"""training.data: crops + in-memory JPEG, determinism across workers/ranks/resume, bad files."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sodiff.jpeg import compress
from training.data import (DataWarning, JPEGPairs, StreamSampler, folder_sources, list_images,
                           store_sources, to_uint8, validation_images)

from conftest import shared_data

CROP = 16


def write_image(path, h=40, w=48, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path):
    for i in range(5):
        write_image(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png", seed=i)
    return tmp_path / "imgs"


def dataset(folder, seed=0, qf=(5, 95)):
    return JPEGPairs(folder_sources(folder, CROP), CROP, qf, seed)


def items(ds, positions, seed=0, batch=1):
    sampler = StreamSampler(len(ds), seed, batch)
    return [ds[sampler.key(p)] for p in positions]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_listing_is_recursive_and_sorted(folder):
    paths = list_images(folder)
    assert len(paths) == 5 and paths == sorted(paths)
    assert any(p.parent.name == "sub" for p in paths)
    with pytest.raises(ValueError, match="does not exist"):
        list_images(folder / "missing")


def test_item_is_a_crop_and_its_jpeg(folder):
    ds = dataset(folder)
    for item in items(ds, range(6)):
        assert item["lq"].shape == item["hq"].shape == (3, CROP, CROP)
        assert item["hq"].min() >= -1 and item["hq"].max() <= 1
        qf = int(item["qf"])
        assert 5 <= qf <= 95
        hq = to_uint8(item["hq"])
        assert np.array_equal(to_uint8(item["lq"]), compress(hq, qf)[0])


def test_qf_range_is_inclusive_and_configurable(folder):
    ds = dataset(folder, qf=(10, 12))
    qfs = {int(it["qf"]) for it in items(ds, range(40))}
    assert qfs == {10, 11, 12}


def test_same_seed_same_items_other_seed_differs(folder):
    a, b, c = dataset(folder), dataset(folder), dataset(folder, seed=1)
    assert same(items(a, range(8)), items(b, range(8)))
    assert not same(items(a, range(8)), items(c, range(8), seed=1))


def test_epochs_permute_every_image_once(folder):
    s = StreamSampler(5, seed=3, batch_size=1)
    for epoch in range(3):
        keys = [s.key(epoch * 5 + i) for i in range(5)]
        assert sorted(k[2] for k in keys) == list(range(5))
        assert {k[0] for k in keys} == {epoch}
    assert [s.key(i)[2] for i in range(5)] != [s.key(5 + i)[2] for i in range(5)]


def loader_batches(ds, n, workers, start=0, rank=0, world=1, batch=2):
    sampler = StreamSampler(len(ds), 0, batch, start, rank, world)
    it = iter(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers))
    return [next(it) for _ in range(n)]


def test_workers_do_not_change_the_data(folder):
    ds = dataset(folder)
    assert same(loader_batches(ds, 4, workers=0), loader_batches(ds, 4, workers=2))


def test_resume_position_continues_the_stream(folder):
    ds = dataset(folder)
    full = loader_batches(ds, 6, workers=0)
    resumed = loader_batches(ds, 3, workers=0, start=3 * 2)  # 3 batches of 2 consumed
    assert same(full[3:], resumed)


def test_ranks_split_the_single_process_stream(folder):
    ds = dataset(folder)
    single = loader_batches(ds, 4, workers=0, batch=2)
    r0 = loader_batches(ds, 2, workers=0, rank=0, world=2, batch=2)
    r1 = loader_batches(ds, 2, workers=0, rank=1, world=2, batch=2)
    assert same(single, [r0[0], r1[0], r0[1], r1[1]])


def test_unreadable_and_small_images_skipped_with_one_warning_each(folder):
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    write_image(folder / "tiny.png", h=8, w=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = folder_sources(folder, CROP)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == 3
    for name in ("broken.png", "empty.jpg", "tiny.png"):
        assert sum(name in m for m in msgs) == 1
    assert len(sources) == 5


def test_truncated_file_replaced_with_one_warning(folder, tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    data = buf.getvalue()
    (folder / "zz_truncated.jpg").write_bytes(data[:len(data) // 2])  # the header is intact
    ds = dataset(folder)
    assert len(ds) == 6
    bad = next(i for i, s in enumerate(ds.sources) if s.path.name == "zz_truncated.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ds[(0, 0, bad)]
        second = ds[(1, 2, bad)]
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1
    assert first["hq"].shape == second["hq"].shape == (3, CROP, CROP)


def test_no_usable_image_is_a_clear_error(tmp_path):
    write_image(tmp_path / "small.png", h=8, w=8)
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="smaller --crop"):
        folder_sources(tmp_path, CROP)


class FakeStore:
    """training.text_embeddings.EmbeddingStore's interface: rows (image path, box, embedding)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def meta(self, i):
        return self.rows[i][:2]


def test_store_crops_are_the_captioned_boxes(folder):
    path = list_images(folder)[0]
    emb = np.arange(77 * 4, dtype=np.float32).reshape(77, 4)
    store = FakeStore([(path, [4, 2, 4 + CROP, 2 + CROP], emb),
                       (path, [40, 0, 40 + CROP, CROP], emb)])  # outside the 48px width
    with pytest.warns(DataWarning, match="outside"):
        sources = store_sources(store)
    assert len(sources) == 1
    ds = JPEGPairs(sources, CROP, (50, 50), 0, store)
    item = ds[(0, 0, 0)]
    ref = np.asarray(Image.open(path).convert("RGB"))[2:2 + CROP, 4:4 + CROP]
    assert np.array_equal(to_uint8(item["hq"]), ref)
    assert torch.equal(item["text"], torch.from_numpy(emb))


def test_validation_images_fixed_qf_centre_crop(folder):
    val = validation_images(folder, side=24, qf=10, limit=3)
    assert len(val) == 3
    for v in val:
        assert v.hq.shape == (24, 24, 3) and v.lq.shape == (1, 3, 24, 24)
        assert np.array_equal(to_uint8(v.lq), compress(v.hq, 10)[0])


def test_bsds_images_load():
    folder = shared_data("BSDS500/val")
    ds = JPEGPairs(folder_sources(folder, 64)[:4], 64, (5, 95), 0)
    assert ds[(0, 0, 3)]["lq"].shape == (3, 64, 64)


def test_patch_is_cut_from_the_compressed_view_on_the_mcu_grid(tmp_path):
    # Issue 13: stage 2 trains the UNet on small patches, but the predictor and SAIPE must see
    # as much of the image as inference gives them: `view` is the whole compressed crop and the
    # patch a piece of it, at a multiple of 16 (4:2:0's MCU), so its JPEG grid is at its origin.
    write_image(tmp_path / "big" / "0.png", h=80, w=96)
    ds = JPEGPairs(folder_sources(tmp_path / "big", 64), 64, (5, 95), 0, patch=16)
    offsets = set()
    for item in items(ds, range(12)):
        view = to_uint8(item["view"])
        assert view.shape == (64, 64, 3) and item["lq"].shape == (3, 16, 16)
        lq = to_uint8(item["lq"])
        hits = [(y, x) for y in range(0, 49, 16) for x in range(0, 49, 16)
                if np.array_equal(view[y:y + 16, x:x + 16], lq)]
        assert hits, "the patch is not an MCU-aligned piece of the view"
        offsets.update(hits)
    assert len(offsets) > 3  # the patch moves within the view
    a, b = items(ds, [3]), items(ds, [3])
    assert same(a, b)
    with pytest.raises(ValueError, match="patch=80"):
        JPEGPairs(folder_sources(tmp_path / "big", 64), 64, (5, 95), 0, patch=80)
