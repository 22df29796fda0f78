import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2clip import ImageError, Preprocess, load_rgb

pre = Preprocess()


def gradient(size=(300, 200)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_matches_torchvision_pipeline():
    from torchvision import transforms as T

    tv = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for size in [(300, 200), (200, 300), (224, 224), (1000, 257)]:
        img = gradient(size)
        out = pre(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        torch.testing.assert_close(out, tv(img), atol=1e-5, rtol=0)


def test_exif_orientation_applied(tmp_path):
    img = gradient((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    upright = img.transpose(Image.Transpose.ROTATE_270)
    assert load_rgb(path).size == (40, 80)
    torch.testing.assert_close(pre(path), pre(upright))
    assert not torch.allclose(pre(path), pre(img))


def test_palette_and_grayscale_and_cmyk():
    img = gradient()
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    torch.testing.assert_close(pre(pal), pre(pal.convert("RGB")))
    cmyk = img.convert("CMYK")
    torch.testing.assert_close(pre(cmyk), pre(cmyk.convert("RGB")))
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    assert pre(buf.getvalue()).shape == (3, 224, 224)
    gray = img.convert("L")
    out = pre(gray)
    torch.testing.assert_close(out, pre(gray.convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr8 = np.asarray(gradient().convert("L"))
    arr16 = arr8.astype(np.uint16) * 257
    path = tmp_path / "deep.png"
    Image.fromarray(arr16).save(path)  # loads back as I;16 or I
    assert Image.open(path).mode in ("I;16", "I")
    torch.testing.assert_close(pre(path), pre(Image.fromarray(arr8, "L")), atol=1e-6, rtol=0)


def test_alpha_flattened_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    assert load_rgb(rgba).getpixel((5, 5)) == (255, 255, 255)
    la = Image.new("LA", (64, 64), (0, 255))
    assert load_rgb(la).getpixel((5, 5)) == (0, 0, 0)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_bytes_raise_image_error(data):
    with pytest.raises(ImageError) as err:
        pre(data)
    assert isinstance(err.value, OSError)


def test_truncated_file_and_missing_file(tmp_path):
    buf = io.BytesIO()
    gradient().save(buf, "JPEG")
    path = tmp_path / "trunc.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.jpg"):
        pre(path)
    with pytest.raises(ImageError, match="missing.jpg"):
        pre(tmp_path / "missing.jpg")


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 160k px > 2× limit → error
    with pytest.raises(ImageError, match="DecompressionBomb"):
        pre(path)
