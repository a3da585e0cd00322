"""Images and model directories from people: every Pillow mode converts correctly; bad files are one line, status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline import image_io
from data_pipeline.ingest import load_nerf_synthetic_object, load_rgb
from data_pipeline.schema import decode_image
from model_zoo.image_to_3d import load_image
from tests.test_trainer import ROOT

WHITE = (1.0, 1.0, 1.0)


def expected_modes(tmp_path) -> dict[str, tuple[str, np.ndarray]]:
    """{mode: (file, the RGB uint8 it must give on white)}, each expectation computed from the pixel values written."""
    out = {}
    grey16 = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")  # Pillow reads it back as I;16
    level = np.rint(grey16 / 65535 * 255).astype(np.uint8)
    out["I;16"] = ("grey16.png", np.stack([level] * 3, -1))

    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30], [200, 200, 0]], dtype=np.uint8)
    indices = np.array([[0, 1, 2, 3]], dtype=np.uint8).repeat(4, 0)
    p = Image.fromarray(indices, mode="P")
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "palette.png")
    out["P"] = ("palette.png", palette[indices])
    p.info["transparency"] = 2  # index 2 fully transparent: white on a white background
    p.save(tmp_path / "palette_t.png", transparency=2)
    with_t = palette[indices].copy()
    with_t[indices == 2] = 255
    out["P+transparency"] = ("palette_t.png", with_t)

    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[:, 0] = (255, 0, 0, 0)  # cyan
    cmyk[:, 1] = (0, 255, 0, 0)  # magenta
    cmyk[:, 2] = (0, 0, 100, 0)
    cmyk[:, 3] = (0, 0, 0, 255)  # black
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tiff")
    rgb = 255 - cmyk[..., :3]  # with K = 0: RGB = 255 - CMY
    rgb[:, 3] = 0
    out["CMYK"] = ("cmyk.tiff", rgb)

    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 200, np.array([0, 64, 128, 255], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    alpha = la[..., 1:2] / 255.0
    out["LA"] = ("la.png", np.rint(np.repeat(la[..., :1] * alpha + 255 * (1 - alpha), 3, -1)).astype(np.uint8))
    return out


def test_every_mode_converts_to_the_right_rgb(tmp_path):
    for mode, (name, expected) in expected_modes(tmp_path).items():
        path = tmp_path / name
        image = image_io.open_image(path)
        assert image.mode == mode.split("+")[0], (name, image.mode)
        np.testing.assert_array_equal(image_io.to_rgb_uint8(image, WHITE), expected, err_msg=mode)
        np.testing.assert_array_equal(load_rgb(str(path), WHITE), expected, err_msg=f"ingest {mode}")
        # image_to_3d: float in [0, 1], composited on white (background "white" so corners do not matter)
        rgb, _ = load_image(path, 4, background="white")
        np.testing.assert_allclose(rgb * 255, expected, atol=1.0, err_msg=f"image_to_3d {mode}")
    # Pillow's own convert clips 16-bit grey to 0..255: nearly everything white (the bug this fixes)
    with Image.open(tmp_path / "grey16.png") as image:
        assert np.asarray(image.convert("RGB"))[0, 1, 0] == 255
    # the reader's decoder (model_zoo.evaluate reads shards through it) scales too
    data = (tmp_path / "grey16.png").read_bytes()
    np.testing.assert_array_equal(decode_image(data), expected_modes(tmp_path)["I;16"][1])


def test_ingest_keeps_16_bit_views(tmp_path):
    folder = tmp_path / "obj"
    folder.mkdir()
    grey = np.full((8, 8), 30000, dtype=np.uint16)
    Image.fromarray(grey).save(folder / "r_0.png")
    c2w = [[1.0, 0, 0, 0], [0, 0, -1, -4], [0, 1, 0, 0], [0, 0, 0, 1]]
    (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.9, "frames": [{"file_path": "r_0", "transform_matrix": c2w}]}))
    sample = load_nerf_synthetic_object(str(folder))
    assert int(decode_image(sample.images[0])[0, 0, 0]) == round(30000 / 65535 * 255)  # 117, not 255


def run(module: str, *args: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """The CLI's main in this process (fast), or as a real subprocess."""
    if subprocess_:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    import contextlib
    import importlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = importlib.import_module(module).main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_files_and_counts_are_one_line_with_status_2(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    missing_model = tmp_path / "no-model"
    half_model = tmp_path / "half-model"
    half_model.mkdir()
    (half_model / "model_config.json").write_text('{"preset": "ti')
    (half_model / "model.safetensors").write_bytes(b"\x00" * 10)
    bad_weights = tmp_path / "bad-weights"
    bad_weights.mkdir()
    (bad_weights / "model_config.json").write_text("{}")
    (bad_weights / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    out = str(tmp_path / "out")
    i3d = "model_zoo.image_to_3d"
    one_line(run(i3d, str(text), "--model", str(missing_model), "--out", out, subprocess_=True), str(text), "not an image")
    one_line(run(i3d, str(truncated), "--model", str(missing_model), "--out", out), str(truncated))
    one_line(run(i3d, str(good), "--model", str(missing_model), "--out", out), str(missing_model), "does not exist")
    one_line(run(i3d, str(good), "--model", str(half_model), "--out", out), "model_config.json", "not valid JSON")
    one_line(run(i3d, str(good), "--model", str(bad_weights), "--out", out), "model.safetensors", "cannot be read")
    one_line(run(i3d, str(good), "--model", str(bad_weights), "--out", out, "--steps", "0"), "--steps")
    ev = "model_zoo.evaluate"
    one_line(run(ev, "--model", str(missing_model), "--data", "x.tar", "--task", "reconstruction", subprocess_=True),
             "does not exist")
    one_line(run(ev, "--model", str(half_model), "--data", "x.tar", "--task", "reconstruction"), "model_config.json")
    for flag in ("--batch-size", "--views-per-object", "--max-objects", "--steps", "--resolution"):
        one_line(run(ev, "--model", str(half_model), "--data", "x.tar", flag, "0"), flag)
    one_line(run(ev, "--model", str(half_model), "--data", "x.tar", "--context-views", "-1"), "--context-views")
    assert not os.path.exists(out)


@pytest.mark.parametrize("payload", [b"", b"GIF89a\x01\x00"])
def test_open_image_names_the_file(tmp_path, payload):
    path = tmp_path / "x.gif"
    path.write_bytes(payload)
    with pytest.raises(image_io.ImageFileError, match=str(path)):
        image_io.open_image(path)


def test_fast_png_path_matches_pillow_and_refuses_corrupt_data():
    """decode_image/decode_mask take 8-bit RGB and grey PNGs through libspng (pyspng); the pixels must be
    Pillow's, and damage that libspng alone would decode into wrong pixels (it ignores CRCs) is refused."""
    import io

    from data_pipeline.schema import SampleError, decode_mask

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (12, 17), dtype=np.uint8)

    def png(array, **options) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG", **options)
        return out.getvalue()

    cases = {"rgb": png(rgb), "rgb optimised": png(rgb, optimize=True),
             "rgb + tRNS": png(rgb, transparency=(1, 2, 3)), "grey": png(grey), "grey + tRNS": png(grey, transparency=7)}
    for name, data in cases.items():
        assert image_io.decode_png_8bit(data) is not None, name  # the fast path is taken
        with Image.open(io.BytesIO(data)) as image:
            expected = image_io.to_rgb_uint8(image, background=None)
        np.testing.assert_array_equal(decode_image(data, 17, 12), expected, err_msg=name)
    np.testing.assert_array_equal(decode_mask(cases["grey"], 17, 12), grey)
    with pytest.raises(SampleError, match="must be 8-bit grey"):
        decode_mask(cases["rgb"])
    data = cases["rgb"]
    idat = data.index(b"IDAT")
    flipped = data[:idat + 20] + bytes([data[idat + 20] ^ 1]) + data[idat + 21:]
    with pytest.raises(SampleError, match="fails its CRC"):
        decode_image(flipped, where="obj view 3")
    with pytest.raises(SampleError, match="truncated PNG"):
        decode_image(data[:idat + 40], where="obj view 3")
