"""Rank-0 logging (metrics file, TensorBoard, progress bar, loss plot) and the preview images."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from data_pipeline import cameras
from data_pipeline.cameras import project_points
from trainer.loss_plot import plot_loss_curves
from trainer.metrics_file import read_metrics
from trainer.metrics_logger import MetricsLogger
from trainer.progress import ProgressBar
from trainer.previews import SEPARATOR_PX, save_preview_grid, save_turntable_gif, turntable_cameras


def _log_steps(run_dir, steps, **kwargs):
    with MetricsLogger(run_dir, enabled=True, **kwargs) as logger:
        for step in steps:
            logger.log(step, {"loss": 1.0 / (step + 1), "target_mse": torch.tensor(0.5 / (step + 1))})


# ------------------------------------------------------------------------------ MetricsLogger


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        yield event



def test_metrics_lines_written_and_read_back(tmp_path):
    _log_steps(tmp_path / "run", range(5))
    path = tmp_path / "run" / "metrics.jsonl"
    assert len(path.read_text().splitlines()) == 5
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[2] == {"step": 2, "loss": pytest.approx(1 / 3), "target_mse": pytest.approx(0.5 / 3)}
    assert all(isinstance(r["target_mse"], float) for r in records)  # tensors were unwrapped


def test_tensorboard_event_file_appears(tmp_path):
    _log_steps(tmp_path, range(3))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_can_be_turned_off(tmp_path):
    _log_steps(tmp_path, range(3), tensorboard=False)
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False)
    logger.log(0, {"loss": 1.0})
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not run_dir.exists()


def test_resume_appends_and_truncate_after_drops_later_steps(tmp_path):
    _log_steps(tmp_path, range(10))  # the first run got to step 9, its last checkpoint was step 6
    with MetricsLogger(tmp_path, enabled=True) as logger:
        assert logger.truncate_after(6) == 4
        for step in range(6, 8):
            logger.log(step, {"loss": 0.01})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert records[5]["loss"] == pytest.approx(1 / 6) and records[6]["loss"] == 0.01
    # the restarted writer opened a second event file (not overwriting the first), which starts
    # with TensorBoard's purge marker: a SessionLog START at step 6 hides the old events from 6 on
    first, second = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    assert [e.step for e in _events(first) if e.HasField("summary")][-1] == 9
    second_events = list(_events(second))
    assert any(e.HasField("session_log") and e.session_log.status == e.session_log.START and e.step == 6
               for e in second_events)
    assert sorted({e.step for e in second_events if e.HasField("summary")}) == [6, 7]


def test_partial_last_line_from_a_kill_is_ignored(tmp_path):
    _log_steps(tmp_path, range(3))
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # SIGKILL in the middle of a write
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        logger.truncate_after(3)
        logger.log(3, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_step_is_a_reserved_metric_name(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger, pytest.raises(ValueError):
        logger.log(0, {"step": 1.0})


# ------------------------------------------------------------------------------- ProgressBar


def test_progress_bar_shows_loss_and_throughput(capsys):
    bar = ProgressBar(total_steps=10, initial_step=4, enabled=True)
    bar.update(5, loss=0.123456, objects_per_s=42.0)
    bar.update(10, loss=0.1, objects_per_s=40.0)
    bar.close()
    err = capsys.readouterr().err
    assert "10/10" in err and "loss=0.1" in err and "obj/s=40.0" in err


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(total_steps=10, initial_step=0, enabled=False)
    bar.update(3, loss=1.0, objects_per_s=1.0)
    bar.close()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------- loss plot


@pytest.mark.parametrize("positive", [True, False])
def test_loss_plot_is_a_readable_png(tmp_path, positive):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        for step in range(0, 500, 5):
            loss = math.exp(-step / 100) + (0.01 if positive else -0.5)
            logger.log(step, {"loss": loss, "target_mse": abs(loss) * 0.6, "context_mse": 0.2, "lr": 1e-4})
        logger.log(500, {"loss": float("nan")})  # a diverged step must not break the plot
    out = tmp_path / "plots" / "loss.png"
    plot_loss_curves(tmp_path / "metrics.jsonl", out)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert 600 <= image.width <= 2000 and 400 <= image.height <= 1500
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert (pixels.std(axis=(0, 1)) > 10).all()  # not blank
    # each curve's colour (loss blue, the next two red and green) is drawn somewhere
    for colour in [(31, 119, 180), (214, 39, 40), (44, 160, 44)]:
        assert (np.abs(pixels - colour).sum(axis=2) < 30).sum() > 50


def test_loss_plot_without_losses_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no finite loss"):
        plot_loss_curves(path, tmp_path / "loss.png")


# ---------------------------------------------------------------------------------- previews


def _solid(batch: int, rgb, size: int) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def _tile(grid: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = row * (size + SEPARATOR_PX), col * (size + SEPARATOR_PX)
    return grid[y:y + size, x:x + size]


def test_preview_grid_layout_and_content(tmp_path):
    batch, k, size = 3, 2, 16
    context = torch.rand(batch, k, 3, size, size)
    target = _solid(batch, (1.0, 0.0, 0.0), size)
    target[1] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # row 1: a blue target
    prediction = _solid(batch, (0.0, 1.0, 0.0), 8) * 1.5  # smaller, and overshooting [0, 1]
    out = tmp_path / "preview.png"
    save_preview_grid(out, context, target, prediction)
    grid = np.asarray(Image.open(out).convert("RGB"))
    cols = k + 2
    assert grid.shape == (batch * size + (batch - 1) * SEPARATOR_PX, cols * size + (cols - 1) * SEPARATOR_PX, 3)
    expected_context = (context.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)
    for row in range(batch):
        for view in range(k):
            np.testing.assert_array_equal(_tile(grid, row, view, size), expected_context[row, view])
        expected_target = (0, 0, 255) if row == 1 else (255, 0, 0)
        assert (_tile(grid, row, k, size) == expected_target).all()
        assert (_tile(grid, row, k + 1, size) == (0, 255, 0)).all()  # resized and clipped
    # the separator lies between the tiles
    assert (grid[:, size:size + SEPARATOR_PX] == 128).all()
    assert (grid[size:size + SEPARATOR_PX, :] == 128).all()


def test_preview_grid_without_context(tmp_path):
    size = 8
    out = tmp_path / "preview.png"
    save_preview_grid(out, torch.zeros(2, 0, 3, size, size), _solid(2, (1.0, 0.0, 0.0), size),
                      _solid(2, (0.0, 0.0, 1.0), size))
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 * size + SEPARATOR_PX, 2 * size + SEPARATOR_PX, 3)
    assert (_tile(grid, 1, 0, size) == (255, 0, 0)).all()
    assert (_tile(grid, 1, 1, size) == (0, 0, 255)).all()


def test_turntable_gif_has_every_frame_and_loops(tmp_path):
    frames = torch.zeros(6, 3, 12, 12)
    for i in range(6):
        frames[i, i % 3, :, : 2 * (i + 1)] = 1.0  # every frame differs from the one before it
    out = tmp_path / "turntable.gif"
    save_turntable_gif(out, frames, fps=10)
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.size == (12, 12)
        assert gif.n_frames == 6
        assert gif.info["loop"] == 0  # 0 = loop forever
        assert gif.info["duration"] == 100
        decoded = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert (decoded[3][:, :8] == (255, 0, 0)).all() and (decoded[3][:, 8:] == 0).all()


def test_turntable_cameras_look_at_the_origin_from_the_radius():
    n, radius, elevation, resolution = 12, 2.5, 30.0, (48, 64)
    K, c2w = turntable_cameras(n, radius, elevation, fov_deg=45.0, resolution=resolution)
    assert K.shape == (n, 3, 3) and c2w.shape == (n, 4, 4)
    assert K.dtype == torch.float32 and c2w.dtype == torch.float32
    eyes = c2w[:, :3, 3].double().numpy()
    np.testing.assert_allclose(np.linalg.norm(eyes, axis=1), radius, rtol=1e-6)
    np.testing.assert_allclose(eyes[:, 2], radius * math.sin(math.radians(elevation)), rtol=1e-6)
    np.testing.assert_allclose(K[0, 0, 0].item(), 0.5 * 64 / math.tan(math.radians(22.5)), rtol=1e-6)
    azimuths = np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0])) % 360
    np.testing.assert_allclose(azimuths, np.arange(n) * 360 / n, atol=1e-4)  # evenly round the circle
    for i in range(n):
        (pixel,), (depth,) = project_points(np.zeros((1, 3)), K[i].double().numpy(), c2w[i].double().numpy())
        np.testing.assert_allclose(pixel, [32.0, 24.0], atol=1e-4)  # (W/2, H/2)
        assert depth == pytest.approx(radius, rel=1e-6)
        # world up (+z) points up in the image: a point above the origin lands above the centre
        (above,), _ = project_points(np.array([[0.0, 0.0, 0.1]]), K[i].double().numpy(), c2w[i].double().numpy())
        assert above[1] < 24.0


def test_one_orbit_implementation_behind_the_turntable_and_single_cameras():
    K, c2w = turntable_cameras(8, 2.0, 15.0, fov_deg=50.0, resolution=32)
    np_K, np_c2w = cameras.turntable_cameras(8, 2.0, 15.0, 50.0, 32)
    assert torch.equal(K, torch.from_numpy(np_K)) and torch.equal(c2w, torch.from_numpy(np_c2w))
    for i in range(8):  # frame i is the orbit camera at azimuth 45° * i
        single_K, single_c2w = cameras.orbit_camera(2.0, 15.0, 45.0 * i, 50.0, 32)
        np.testing.assert_allclose(np_K[i], single_K, rtol=1e-6)
        np.testing.assert_allclose(np_c2w[i], single_c2w, atol=1e-6)
    cameras.check_cameras(np_K, np_c2w, where="turntable")
    with pytest.raises(ValueError, match="radius"):
        turntable_cameras(4, 0.0, 10.0, 50.0, 32)
