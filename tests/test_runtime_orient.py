"""runtime/orient.py and the Restorer on a JPEG's stored grid: a photo with an EXIF orientation
is restored as its upright twin (the same file without the tag) would be, then turned."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from runtime import Restorer
from runtime.imageio import read_image
from runtime.orient import stored, upright

ORIENTATION = 0x0112


@pytest.mark.parametrize("o", range(1, 9))
def test_upright_is_pillows_exif_transpose_and_stored_undoes_it(o):
    a = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[ORIENTATION] = o
    im.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(upright(a, o), want)
    assert np.array_equal(stored(upright(a, o), o), a)


def test_a_bad_orientation_is_named():
    with pytest.raises(ValueError, match="orientation=9"):
        upright(np.zeros((2, 2)), 9)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from fixtures.runtime_engines import tiny_engine
    return tiny_engine(tmp_path_factory.mktemp("tiny-orient"))[0]


def _photo():
    from conftest import shared_data
    try:
        with Image.open(shared_data("LIVE1_color") / "bikes.png") as im:
            return np.asarray(im.convert("RGB"))[:45, :61].copy()
    except (OSError, FileNotFoundError):  # an unreadable test image: a smooth synthetic photo
        y, x = np.mgrid[:45, :61]
        return np.stack([(x * 4) % 256, (y * 5) % 256, (x + y) * 2 % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("o", [3, 6, 8])
def test_a_rotated_jpeg_with_odd_sides_is_restored_as_its_upright_twin(engine, tmp_path, o):
    photo = _photo()  # 61x45: neither side a multiple of 8
    files = {}
    for name, tag in (("twin", 1), ("rotated", o)):
        exif = Image.Exif()
        exif[ORIENTATION] = tag
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, "JPEG", quality=25, exif=exif.tobytes())
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(buf.getvalue())
    with Restorer(engine) as r:
        reports = {n: r.restore_file(p, tmp_path / f"{n}.png") for n, p in files.items()}
    twin, rotated = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("twin", "rotated"))
    assert reports["rotated"]["tau"] == reports["twin"]["tau"]
    assert reports["rotated"]["jpeg_constraint"] and reports["rotated"]["constraint_k"] == "file"
    assert np.array_equal(rotated, upright(twin, o))
    assert rotated.shape == read_image(files["rotated"]).array.shape  # the input as shown
