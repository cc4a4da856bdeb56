"""IMAGE tensors to and from PIL and PNG: 8-bit round trips, the same bytes for the same pixels, and image folders
loaded as ComfyUI batches (sorted, EXIF-rotated, centre-cropped), checked against pixels computed by hand."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from finextract_core.images import check_image_batch, from_pil, load_image_folder, png_bytes, to_pil


def test_values_become_the_nearest_byte_and_come_back_exactly():
    image = torch.tensor([[[0.0, 0.5, 1.0], [-0.2, 1.3, 0.2]]])  # [H=1, W=2, 3]
    picture = to_pil(image)
    assert picture.mode == "RGB" and picture.size == (2, 1)
    # round(255 v), values outside 0..1 clipped: 0.5 -> 127.5 -> 128, 0.2 -> 51.
    assert np.asarray(picture).tolist() == [[[0, 128, 255], [0, 255, 51]]]
    back = from_pil(picture)
    assert back.dtype == torch.float32 and back.shape == (1, 2, 3)
    assert torch.allclose(back, torch.tensor([[[0.0, 128 / 255, 1.0], [0.0, 1.0, 51 / 255]]]))
    assert torch.equal(from_pil(to_pil(back)), back), "a byte-exact image must survive a second round trip"


def test_png_bytes_are_a_function_of_the_pixels():
    pixels = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))
    first, second = png_bytes(to_pil(pixels)), png_bytes(to_pil(pixels.clone()))
    assert first == second and first.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(first)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(to_pil(pixels)))


def test_folder_loads_sorted_rotated_and_cropped(tmp_path):
    # b.png: 4 x 2 (wide) with distinct columns; its centre 2 x 2 crop at size 2 keeps columns 1 and 2.
    wide = np.zeros((2, 4, 3), dtype=np.uint8)
    wide[:, :, 0] = [[10, 20, 30, 40]] * 2
    Image.fromarray(wide).save(tmp_path / "b.png")
    # a.jpg would sort first; a.txt is not an image and is skipped.
    Image.fromarray(np.full((2, 2, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("not an image")
    # c.png stored 2 wide x 1 high with EXIF orientation 6 (rotate 90 degrees clockwise to display): 1 x 2 upright.
    tall = Image.fromarray(np.array([[[0, 0, 0], [250, 250, 250]]], dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.save(tmp_path / "c.png", exif=exif)
    batch, names = load_image_folder(str(tmp_path), 2)
    assert names == ["a.png", "b.png", "c.png"] and batch.shape == (3, 2, 2, 3)
    assert torch.allclose(batch[0], torch.full((2, 2, 3), 200 / 255))
    assert torch.allclose(batch[1, :, :, 0], torch.tensor([[20 / 255, 30 / 255]] * 2))
    # Displayed upright, the black pixel is on top and the white one below, whatever the scaling does between.
    assert batch[2, 0].mean() < batch[2, 1].mean()


def test_bad_folders_and_batches_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: give the full path"):
        load_image_folder(str(tmp_path / "missing"), 8)
    with pytest.raises(ValueError, match="no images .* put the reference images there"):
        load_image_folder(str(tmp_path), 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read 'broken.png'.*remove or replace the file"):
        load_image_folder(str(tmp_path), 8)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        check_image_batch(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="float images"):
        check_image_batch(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
